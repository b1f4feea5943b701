"""What production does to the ranking API (issue 12): each test reproduces one failure of the
fault probe — a corrupt index that segfaults ANNOY, a refused CURRENT at start-up, a ranker down at
start-up, non-finite JSON, overload, slow or disconnecting clients — and checks the answer.

Planted: the serving world of tests/serving_world.py, copied where a test changes it.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from serving_world import World, running_server, wait_ready

from deepclick.publish import MANIFEST, checksums, set_current
from deepclick.settings import PredictorSettings, ServingSettings, Settings
from serving.app import create_app
from serving.index_probe import IndexProbeError, probe_index
from serving.release import RELEASE_FILE, LoadedRelease, ReleaseError, load_release
from serving.reloader import ReleaseHolder

USER, PLACEMENT = "u00010", "p003"
RANK = {"user_id": USER, "placement_id": PLACEMENT, "num_ads": 5}


@pytest.fixture(scope="module")
def client(world: World, loaded: LoadedRelease) -> Iterator[TestClient]:
    app = create_app(world.settings(), holder=ReleaseHolder(loaded), watch=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _rewrite_manifest(folder: Path) -> None:
    """What a buggy or hostile builder does: recompute the checksums over altered files."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["checksums"] = checksums(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def corrupt_release(world: World, root: Path, version: str) -> Path:
    """A copy of the world's release under ``root`` as ``version`` whose index has random bytes
    over its split nodes (items and roots kept, so pairing checks pass and ANNOY loads it —
    searching it then segfaults or aborts the process), with every manifest and
    release.json digest recomputed: only searching the forest can tell."""
    index = root / "artifacts" / "index" / version
    shutil.copytree(world.index, index)
    ann = index / "ads.ann"
    manifest = json.loads((index / MANIFEST).read_text())
    node = ann.stat().st_size // manifest["counts"]["ann_nodes"]
    # items first (kept: pairing spot checks pass), roots last (kept: ANNOY loads the file)
    first = manifest["counts"]["ads"] * node
    last = ann.stat().st_size - 2 * manifest["n_trees"] * node
    with ann.open("r+b") as handle:
        handle.seek(first)
        handle.write(np.random.default_rng(0).bytes(last - first))
    manifest["version"] = version
    (index / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _rewrite_manifest(index)
    release = root / "releases" / version
    shutil.copytree(world.release, release)
    spec = json.loads((release / RELEASE_FILE).read_text())
    spec["version"] = version
    spec["index"]["folder"] = f"artifacts/index/{version}"
    spec["index"]["version"] = version
    spec["index"]["manifest_sha256"] = (
        __import__("hashlib").sha256((index / MANIFEST).read_bytes()).hexdigest()
    )
    (release / RELEASE_FILE).write_text(json.dumps(spec, indent=2))
    _rewrite_manifest(release)
    return release


@pytest.fixture(scope="module")
def copied(world: World, tmp_path_factory: pytest.TempPathFactory) -> World:
    """A copy of the world's state root with a corrupt release 20240109, CURRENT at 20240103."""
    root = tmp_path_factory.mktemp("faults") / "var"
    shutil.copytree(world.root, root, ignore=shutil.ignore_patterns("mlruns", "*.db"))
    corrupt_release(world, root, "20240109")
    set_current(root / "releases", "20240103")
    return World(**{**world.__dict__, "root": root})


# --------------------------------------------------------------------------- corrupt index


def test_an_index_that_segfaults_annoy_is_refused_by_a_child_process(copied: World) -> None:
    # Issue 12 item 1: the warm-up search killed the serving process with SIGSEGV (on the old
    # code, this test's own process dies).
    index = copied.root / "artifacts" / "index" / "20240109"
    with pytest.raises(IndexProbeError, match=r"SIGSEGV|SIGABRT|SIGBUS"):
        probe_index(index, timeout_s=30)
    probe_index(copied.root / "artifacts" / "index" / "20240103", timeout_s=30)
    with pytest.raises(ReleaseError, match="child process"):
        load_release(copied.root / "releases" / "20240109", copied.settings())


def test_hot_reload_onto_a_segfaulting_index_keeps_serving(copied: World) -> None:
    app = create_app(copied.settings(reload_interval_s=0.1))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        wait_ready(http)
        set_current(copied.root / "releases", "20240109")
        deadline = time.monotonic() + 60
        while app.state.reloader.last_error is None and time.monotonic() < deadline:
            assert http.post("/v1/rank", json=RANK).status_code == 200
            time.sleep(0.05)
        assert "child process" in app.state.reloader.last_error
        assert http.post("/v1/rank", json=RANK).json()["versions"]["release"] == "20240103"
    set_current(copied.root / "releases", "20240103")


# --------------------------------------------------------------------------- last known good


def test_a_start_on_a_refused_current_serves_the_newest_release_that_loads(copied: World) -> None:
    # Issue 12 item 2: workers started on a refused CURRENT served nothing (503).
    set_current(copied.root / "releases", "20240109")
    try:
        app = create_app(copied.settings(reload_interval_s=0.1))
        with TestClient(app) as http:
            ready = wait_ready(http)
            # the newest besides the refused 20240109 (another module may have truncated 20240105)
            assert ready["release"] in ("20240105", "20240104")
            assert "20240109" in ready["note"] and "refused" in ready["note"]
            info = http.get("/v1/release").json()
            assert "20240109" in info["note"] and info["versions"]["release"] == ready["release"]
            assert http.post("/v1/rank", json=RANK).status_code == 200
            outcome = {"outcome": "fallback"}
            assert app.state.metrics.sample("deepclick_release_reloads_total", outcome) == 1
            set_current(copied.root / "releases", "20240103")  # a good CURRENT takes over
            deadline = time.monotonic() + 60
            while http.get("/readyz").json()["release"] != "20240103":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert http.get("/readyz").json()["note"] is None
    finally:
        set_current(copied.root / "releases", "20240103")


# --------------------------------------------------------------------------- ranker down at start


def _silent_server() -> tuple[socket.socket, str]:
    """A TCP listener that accepts and never answers (a hung TF Serving)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("ranker", ["dead", "silent"])
def test_a_ranker_down_at_start_up_gives_degraded_answers_and_stays_ready(
    world: World, ranker: str
) -> None:
    # Issue 12 item 3: the warm-up failed, nothing loaded, every request got 503.
    listener, target = _silent_server()
    if ranker == "dead":
        listener.close()
    settings = Settings(
        root=world.root,
        predictor=PredictorSettings(backend="grpc", target=target, timeout_ms=50),
        serving=ServingSettings(reload_interval_s=0.1, warmup_timeout_s=0.5),
    )
    world.set_current(world.release)
    try:
        with TestClient(create_app(settings)) as http:
            ready = wait_ready(http)
            assert ready["status"] == "degraded" and ready["release"] == "20240103"
            body = http.post("/v1/rank", json=RANK).json()
            assert body["degraded"] is True and len(body["ads"]) == 5
            assert "degraded" in http.get("/v1/release").json()["note"]
    finally:
        listener.close()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body",
    [
        '{"user_id":"u0","placement_id":"p0","num_ads":NaN}',
        '{"user_id":"u0","placement_id":"p0","num_ads":Infinity}',
        '{"user_id":"u0","placement_id":"p0","num_ads":-Infinity}',
        '{"user_id":"u0","placement_id":"p0","num_ads":1e400}',
        '{"user_id":"u0","placement_id":"p0","unknown":NaN}',
        '{"user_id":"u0","placement_id":"p0","user_features":{"u_f":NaN}}',
        '{"user_id":"u0","placement_id":"p0","context_features":{"x":1e400}}',
        '{"user_id":"\\ud800","placement_id":"p0"}',
        '{"user_id":"u0","placement_id":"p0","exclude_ad_ids":["\\udfff"]}',
        '{"user_id":"u0","placement_id":"p0","\\ud800":1}',
    ],
)
def test_non_finite_numbers_and_lone_surrogates_get_422_not_500(
    client: TestClient, body: str
) -> None:
    # Issue 12 item 5: the 422 handler echoed the input and the JSON encoder failed on it.
    response = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    metrics = client.app.state.metrics
    assert metrics.sample("deepclick_errors_total", {"kind": "ValueError"}) == 0


def test_release_info_names_no_absolute_server_path(client: TestClient, world: World) -> None:
    info = client.get("/v1/release").json()
    assert info["folder"] == "releases/20240103"
    assert str(world.root) not in json.dumps(info)


# --------------------------------------------------------------------------- slow clients


def test_disconnects_half_sent_bodies_and_huge_headers_are_answered_and_counted(
    world: World, loaded: LoadedRelease
) -> None:
    # Issue 12 item 8: disconnects counted as 500; no body timeout; a 10 MB header got 200.
    settings = world.settings(body_timeout_s=0.3, max_header_bytes=8192)
    app = create_app(settings, holder=ReleaseHolder(loaded), watch=False)
    metrics = app.state.metrics
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        head = "POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection((host, int(port))) as half:
            half.sendall(f"{head}Content-Length: 100\r\n\r\n{{".encode())
            started = time.monotonic()
            answer = half.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        with socket.create_connection((host, int(port))) as gone:
            gone.sendall(f"{head}Content-Length: 100\r\n\r\n{{".encode())
        with httpx.Client(base_url=url) as http:
            huge = http.post("/v1/rank", json=RANK, headers={"x-big": "a" * 20_000})
            assert huge.status_code == 431
            time.sleep(0.5)
            text = http.get("/metrics").text
    assert 'status="500"' not in text
    assert metrics.sample("deepclick_requests_total", {"route": "/v1/rank", "status": "408"}) == 1
    assert metrics.sample("deepclick_requests_total", {"route": "/v1/rank", "status": "499"}) == 1


# --------------------------------------------------------------------------- overload


def test_overload_is_answered_with_fast_503s_and_accepted_requests_meet_the_deadline(
    world: World, loaded: LoadedRelease
) -> None:
    # Issue 12 item 7: 32 connections on one worker queued without limit (p99 2.4 s).
    settings = world.settings(max_in_flight=2, request_deadline_ms=2000)
    app: FastAPI = create_app(settings, holder=ReleaseHolder(loaded), watch=False)
    results: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def client_loop(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(6):
                started = time.perf_counter()
                response = http.post("/v1/rank", json={**RANK, "num_candidates": 400})
                with lock:
                    results.append((response.status_code, time.perf_counter() - started,
                                    response.headers.get("retry-after")))  # fmt: skip

    with running_server(app) as url, ThreadPoolExecutor(16) as pool:
        list(pool.map(client_loop, [url] * 16))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 6
    refused = [(s, t, r) for s, t, r in results if s == 503]
    assert refused and all(retry == "1" for _, _, retry in refused)
    assert max(t for _, t, _ in refused) < 1.0  # answered, not queued
    assert max(t for s, t, _ in results if s == 200) < 2.0 + 1.0  # within the deadline
    counted = app.state.metrics.sample("deepclick_rejected_total", {"reason": "overload"})
    assert counted == len(refused)
