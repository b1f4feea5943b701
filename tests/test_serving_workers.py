"""``deepclick serve --workers N``: N uvicorn processes on one port, one SO_REUSEPORT socket each.

Issue 14's finding, reproduced first: with uvicorn's own workers (one shared listening socket) 32
keep-alive connections opened together went 31 to one worker and 1 to the other, so a 2-worker
server under a closed-loop load answered no more than one worker. Here the supervisor's workers
must each get a fair share, every time; a worker that dies is replaced; a port held by someone else
or an app that cannot start stops the server with an error that says so.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_world import World
from worker_probe_app import BROKEN_MARKER_ENV

from serving.metrics import MULTIPROC_ENV
from serving.workers import WorkerSpec, WorkerStartupError, WorkerSupervisor

CONNECTIONS = 32
USER, PLACEMENT = "u00010", "p003"  # of the serving world
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pids_of_connections(port: int, connections: int = CONNECTIONS) -> list[int]:
    """The worker pid answering each of ``connections`` connections opened at the same moment."""

    async def one() -> int:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            return int((await client.get("/pid")).json()["pid"])

    async def together() -> list[int]:
        return list(await asyncio.gather(*(one() for _ in range(connections))))

    return asyncio.run(together())


def _wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not true within {timeout_s} s")


@pytest.fixture
def supervised() -> Iterator[tuple[WorkerSupervisor, int]]:
    """Two supervised workers of the pid app on a free loopback port, stopped afterwards."""
    port = _free_port()
    supervisor = WorkerSupervisor(
        WorkerSpec("worker_probe_app:pid_app", "127.0.0.1", port, log_level="warning"), 2,
        poll_s=0.1,
    )  # fmt: skip
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    _wait_until(lambda: len(set(_pids_of_connections(port))) == 2)
    yield supervisor, port
    supervisor.stop()
    thread.join(30)
    assert not thread.is_alive()


def test_connections_opened_together_are_spread_over_every_worker(supervised) -> None:
    supervisor, port = supervised
    for _ in range(5):
        shares = collections.Counter(_pids_of_connections(port))
        assert set(shares) == set(supervisor.pids)
        # Binomial(32, 1/2): below 6 of 32 on one side happens once in ~40,000 draws.
        assert min(shares.values()) >= 6, shares


def test_a_worker_that_dies_is_replaced_and_the_port_keeps_answering(supervised) -> None:
    supervisor, port = supervised
    victim, survivor = supervisor.pids
    os.kill(victim, signal.SIGKILL)
    _wait_until(lambda: supervisor.restarts == 1, timeout_s=10)
    _wait_until(lambda: set(_pids_of_connections(port)) == set(supervisor.pids))
    assert victim not in supervisor.pids and survivor in supervisor.pids


def test_a_replacement_that_cannot_start_leaves_the_healthy_worker_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a server that never served stops on a start-up failure: once serving, a replacement
    worker that cannot start (here its app raises) is retried with a growing pause while the
    other worker keeps answering, and it serves again once the cause is gone."""
    marker = tmp_path / "broken"
    monkeypatch.setenv(BROKEN_MARKER_ENV, str(marker))  # inherited by the spawned workers
    port = _free_port()
    spec = WorkerSpec("worker_probe_app:flaky_app", "127.0.0.1", port, log_level="critical")
    supervisor = WorkerSupervisor(spec, 2, poll_s=0.1)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: len(set(_pids_of_connections(port))) == 2)
        marker.touch()
        victim, survivor = supervisor.pids
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: supervisor.failed_starts >= 2, timeout_s=30)
        assert thread.is_alive()
        assert set(_pids_of_connections(port)) == {survivor}
        marker.unlink()
        _wait_until(lambda: len(set(_pids_of_connections(port))) == 2, timeout_s=60)
    finally:
        supervisor.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_port_held_by_another_program_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        supervisor = WorkerSupervisor(WorkerSpec("worker_probe_app:pid_app", "127.0.0.1", port), 2)
        with pytest.raises(WorkerStartupError, match=f"cannot serve on 127.0.0.1:{port}"):
            supervisor.run()
        assert supervisor.pids == []


def test_an_app_that_cannot_start_stops_the_server_instead_of_restarting_forever() -> None:
    spec = WorkerSpec("worker_probe_app:broken_app", "127.0.0.1", _free_port(), "critical")
    supervisor = WorkerSupervisor(spec, 2, poll_s=0.1)
    with pytest.raises(WorkerStartupError, match="before it served"):
        supervisor.run()
    assert supervisor.restarts == 0
    assert all(w.process.exitcode is not None for w in supervisor._running)  # all reaped


def test_deepclick_serve_with_two_workers_answers_on_every_connection_and_sums_metrics(
    world: World, tmp_path: Path
) -> None:
    """The real entry point over the serving world: both workers load the release and rank, the
    /metrics of either one counts the requests of both, and SIGTERM stops every process."""
    world.set_current(world.release)
    port = _free_port()
    env = {
        **os.environ,
        "DEEPCLICK_ROOT": str(world.root),
        # As World.settings: 32 requests at once are all admitted and none meets a deadline.
        "DEEPCLICK_SERVING__MAX_IN_FLIGHT": "64",
        "DEEPCLICK_SERVING__REQUEST_DEADLINE_MS": "30000",
        "DEEPCLICK_PREDICTOR__TIMEOUT_MS": "10000",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop(MULTIPROC_ENV, None)
    log = tmp_path / "serve.log"  # a file, not a pipe: nobody reads it while the server runs
    command = [
        sys.executable,
        "-m",
        "deepclick_cli",
        "serve",
        "--workers",
        "2",
        "--port",
        str(port),
    ]
    with log.open("w") as stderr:
        server = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    body = {"user_id": USER, "placement_id": PLACEMENT, "num_ads": 5}

    async def rank_on_fresh_connections() -> list[int]:
        async def one() -> int:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                return (await c.post("/v1/rank", json=body)).status_code

        return list(await asyncio.gather(*(one() for _ in range(CONNECTIONS))))

    try:
        _wait_until(lambda: asyncio.run(rank_on_fresh_connections()) == [200] * CONNECTIONS, 180)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        answered = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('deepclick_requests_total{route="/v1/rank",status="200"}')
        )
        assert answered >= CONNECTIONS  # from both workers: each alone saw about half
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]
    _wait_until(lambda: not _group_alive(server.pid), timeout_s=15)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
