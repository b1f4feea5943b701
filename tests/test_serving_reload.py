"""Hot reload: a new release is swapped in under load without losing a request, and a broken one
is refused while the old one keeps serving (DESIGN.md, "Pairing": releases swap atomically)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from serving_world import World, running_server, wait_ready

from deepclick.publish import set_current
from serving.app import create_app
from serving.metrics import ServingMetrics
from serving.release import LoadedRelease, ReleaseError, ReleaseWarmupError
from serving.reloader import ReleaseHolder, Reloader


@pytest.fixture(scope="module")
def watched(world: World) -> Iterator[tuple[FastAPI, str]]:
    """A real server whose watcher polls CURRENT every 0.1 s; CURRENT is restored afterwards."""
    world.set_current(world.release)
    app = create_app(world.settings(reload_interval_s=0.1))
    try:
        with running_server(app) as url:
            with httpx.Client(base_url=url) as http:
                wait_ready(http)
            yield app, url
    finally:
        world.set_current(world.release)


def _hammer(url: str, stop: threading.Event, out: list[tuple[int, str | None]]) -> None:
    """Send rank requests back to back until ``stop``; record (status, release version)."""
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            response = http.post(
                "/v1/rank", json={"user_id": "u00042", "placement_id": "p001", "num_ads": 5}
            )
            version = response.json()["versions"]["release"] if response.is_success else None
            out.append((response.status_code, version))


def _versions_seen(watched: tuple[FastAPI, str], seconds: float) -> list[tuple[int, str | None]]:
    _, url = watched
    with httpx.Client(base_url=url) as http:
        return [
            (r.status_code, r.json()["versions"]["release"])
            for r in (
                http.post("/v1/rank", json={"user_id": "u00001", "placement_id": "p002"})
                for _ in range(max(1, int(seconds / 0.02)))
            )
        ]


def test_hot_reload_under_concurrent_load_loses_no_request(
    world: World, watched: tuple[FastAPI, str]
) -> None:
    app, url = watched
    metrics: ServingMetrics = app.state.metrics
    loaded_before = metrics.sample("deepclick_release_reloads_total", {"outcome": "loaded"})
    stop = threading.Event()
    results: list[list[tuple[int, str | None]]] = [[] for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        for out in results:
            pool.submit(_hammer, url, stop, out)
        time.sleep(0.5)
        world.set_current(world.second_release)  # publish: move CURRENT
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(version == "20240104" for out in results for _, version in out[-3:]):
                break
            time.sleep(0.05)
        time.sleep(0.5)  # keep the load on after the swap
        stop.set()
    every = [item for out in results for item in out]
    assert len(every) > 20
    assert all(status == 200 for status, _ in every), {s for s, _ in every}
    for out in results:  # per client: old release, then new, never back
        versions = [v for _, v in out]
        switch = versions.index("20240104") if "20240104" in versions else len(versions)
        assert set(versions[:switch]) <= {"20240103"} and set(versions[switch:]) <= {"20240104"}
    assert {v for _, v in every} == {"20240103", "20240104"}
    loaded_after = metrics.sample("deepclick_release_reloads_total", {"outcome": "loaded"})
    assert loaded_after == loaded_before + 1
    assert app.state.holder.current.versions["index"] == "20240104"


def test_a_corrupt_release_is_refused_and_the_old_one_keeps_serving(
    world: World, watched: tuple[FastAPI, str]
) -> None:
    app, url = watched
    metrics: ServingMetrics = app.state.metrics
    serving = app.state.holder.current.versions
    refused_before = metrics.sample("deepclick_release_reloads_total", {"outcome": "refused"})
    ann = world.spare_index / "ads.ann"  # only the spare release uses this copy
    with ann.open("r+b") as handle:
        handle.truncate(ann.stat().st_size // 2)
    world.set_current(world.spare_release)
    deadline = time.monotonic() + 60  # validation includes a search in a child process
    while app.state.reloader.last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # ten more polls: not retried
    answers = _versions_seen(watched, 0.3)
    assert all(status == 200 and version == serving["release"] for status, version in answers)
    assert app.state.holder.current.versions == serving
    refused = metrics.sample("deepclick_release_reloads_total", {"outcome": "refused"})
    assert refused == refused_before + 1  # refused once, not retried every poll
    assert "truncated" in app.state.reloader.last_error
    with httpx.Client(base_url=url) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        assert 'deepclick_release_reloads_total{outcome="refused"}' in http.get("/metrics").text
    world.set_current(world.release)  # a good release after a refused one still loads
    deadline = time.monotonic() + 60
    while app.state.holder.current.version != "20240103" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.holder.current.version == "20240103"


# --------------------------------------------------------------------------- the watcher alone


class FakeRelease:
    def __init__(self, key: str) -> None:
        self.key = key
        self.version = key.split(":")[0]
        self.versions = {"release": self.version}
        self.load_seconds = 0.0
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_watcher_retries_a_ranker_that_is_not_ready_and_skips_a_refused_release(
    world: World, tmp_path: Path
) -> None:
    settings = world.settings()
    folder = world.release
    calls: list[str] = []
    outcomes = iter(
        [ReleaseWarmupError("TF Serving has not loaded it yet"), ReleaseError("checksum"), "ok"]
    )

    def loader(path: Path, _: object) -> LoadedRelease:
        calls.append(path.name)
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        from serving.release import release_key

        return FakeRelease(release_key(path))  # type: ignore[return-value]

    holder = ReleaseHolder(FakeRelease("serving:0"))  # serving something: no fallback search
    reloader = Reloader(settings, holder, ServingMetrics(), loader=loader)
    set_current(world.root / "releases", folder.name)
    assert reloader.poll_once() == "retry"  # warmup failed: transient, try again
    assert reloader.poll_once() == "refused"  # validation failed: remembered
    assert reloader.poll_once() == "skipped"  # the same folder is not reloaded every poll
    assert calls == [folder.name, folder.name]
    set_current(world.root / "releases", world.second_release.name)  # CURRENT moves on
    assert reloader.poll_once() == "loaded" and holder.current is not None
    assert reloader.poll_once() == "unchanged"
    assert reloader.metrics.sample("deepclick_release_reloads_total", {"outcome": "retry"}) == 1
    world.set_current(world.release)


def test_a_request_keeps_the_release_it_started_with() -> None:
    old, new = FakeRelease("a:1"), FakeRelease("b:2")
    holder = ReleaseHolder(old)  # type: ignore[arg-type]
    taken = holder.current  # what a request's dependency took
    assert holder.swap(new) is old  # type: ignore[arg-type]
    assert taken is old and holder.current is new and not old.closed
