"""Several uvicorn processes on one port, each accepting on its own ``SO_REUSEPORT`` socket.

Why not ``uvicorn --workers``: its workers all accept from one shared listening socket, and the
event loop that wakes first accepts every connection waiting (uvloop drains the queue). Clients
that keep their connections open — a load balancer's pool, the benchmark's closed loop — are then
spread by luck: 32 connections opened together went 31 to one worker and 1 to the other, and one
8-connection load split a 2-worker server's CPU 3.90 s / 0.02 s (issue 14). Here every worker
binds its own socket to the same address with ``SO_REUSEPORT``, so the kernel assigns each new
connection to a worker by the hash of its addresses: about evenly, whatever the workers are doing.

The supervisor keeps the uvicorn supervisor's duties that deepclick needs: a worker that dies after
it started serving is replaced (the port never goes dark; a native crash in a library must not
take the API down for good); when no worker has served yet, a worker that fails to start stops
everything with an error (a port held by another program, or an app that cannot start, would fail
the same way on every restart), while later a replacement that fails to start is retried with a
growing pause as the other workers keep serving; SIGINT/SIGTERM stop the workers gracefully. Not
kept: SIGHUP restarts and
SIGTTIN/SIGTTOU scaling — releases are hot-reloaded by each worker (``serving.reloader``), so a
restart is never how a new model reaches the API.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import uvicorn

from deepclick.errors import DeepclickError

logger = logging.getLogger("uvicorn.error")
_spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no TF or JVM state forked


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker serves and where: ``app_factory`` is an import string (``module:name``)
    of a function returning the ASGI app, called in the worker itself."""

    app_factory: str
    host: str
    port: int
    log_level: str = "info"
    timeout_graceful_shutdown: int = 10


class WorkerStartupError(DeepclickError):
    """A worker exited before it served a request: retrying would fail the same way."""


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other ``SO_REUSEPORT`` sockets of this user may
    share; uvicorn puts it in listening state."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port that any socket holds, before workers bind it with ``SO_REUSEPORT``: that
    option would otherwise let them join a forgotten deepclick server of the same user on the
    same port and split its traffic silently."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as error:
            raise WorkerStartupError(f"cannot serve on {host}:{port}: {error.strerror}") from error


def serve_one(spec: WorkerSpec, ready: Event | None = None) -> None:
    """Serve ``spec`` in this process on a socket of its own until told to stop; set ``ready``
    once the server accepts connections (the supervisor's sign that the start-up succeeded)."""
    config = uvicorn.Config(
        spec.app_factory,
        factory=True,
        log_level=spec.log_level,
        access_log=False,  # one log line per request costs more than the ranking's sort
        timeout_graceful_shutdown=spec.timeout_graceful_shutdown,
    )
    server = uvicorn.Server(config)
    sock = reuse_port_socket(spec.host, spec.port)
    if ready is not None:
        threading.Thread(target=_signal_when_started, args=(server, ready), daemon=True).start()
    server.run(sockets=[sock])


def _signal_when_started(server: uvicorn.Server, ready: Event) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        ready.set()


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
"""Pauses before restarting a worker whose replacement failed to start: 0.5 s, doubling, capped."""


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    ready: Event


class WorkerSupervisor:
    """Runs ``workers`` processes of :func:`serve_one` and keeps that many alive until stopped."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        *,
        on_worker_exit: Callable[[int], None] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.spec = spec
        self.workers = workers
        self.on_worker_exit = on_worker_exit
        self.poll_s = poll_s
        self.restarts = 0
        """Workers replaced after they died while serving."""
        self.failed_starts = 0
        """Replacements that exited before they served (retried with a growing pause)."""
        self._served = False
        self._failures = [0] * workers
        self._retry_at: list[float | None] = [None] * workers
        self._stop = threading.Event()
        self._running: list[_Worker] = []

    def stop(self) -> None:
        """Ask :meth:`run` to stop the workers and return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """Start the workers and supervise them until :meth:`stop`, SIGINT or SIGTERM."""
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            previous = {
                sig: signal.signal(sig, lambda *_: self._stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)
            }
        try:
            ensure_port_free(self.spec.host, self.spec.port)
            self._running = [self._start() for _ in range(self.workers)]
            logger.info(
                "deepclick: %d workers on %s:%d, one SO_REUSEPORT socket each (pids %s)",
                self.workers, self.spec.host, self.spec.port,
                ", ".join(str(w.process.pid) for w in self._running),
            )  # fmt: skip
            while not self._stop.wait(self.poll_s):
                self._replace_dead()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def pids(self) -> list[int]:
        """The workers alive now."""
        return [w.process.pid for w in self._running if w.process.is_alive() and w.process.pid]

    def _start(self) -> _Worker:
        ready = _spawn.Event()
        process = _spawn.Process(target=serve_one, args=(self.spec, ready), daemon=False)
        process.start()
        return _Worker(process, ready)

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for slot, worker in enumerate(self._running):
            if worker.ready.is_set():
                self._served = True
                self._failures[slot] = 0
            if worker.process.is_alive() or self._stop.is_set():
                continue
            retry_at = self._retry_at[slot]
            if retry_at is not None:  # a failed start, already counted: waiting for its pause
                if now >= retry_at:
                    self._retry_at[slot] = None
                    self._running[slot] = self._start()
                continue
            worker.process.join()
            pid, code = worker.process.pid, worker.process.exitcode
            if self.on_worker_exit is not None and pid is not None:
                self.on_worker_exit(pid)
            if worker.ready.is_set():
                logger.error("worker %s died (exit code %s); starting a new one", pid, code)
                self.restarts += 1
                self._running[slot] = self._start()
                continue
            failure = (
                f"a worker exited with code {code} before it served on {self.spec.host}:"
                f"{self.spec.port} (the port is held by another program, or the app failed to "
                "start: see the log above)"
            )
            if not self._served:  # it never worked: every retry would fail the same way
                raise WorkerStartupError(f"{failure}; stopping")
            self.failed_starts += 1
            self._failures[slot] += 1
            pause = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures[slot] - 1))
            logger.error("%s; the other workers keep serving, retrying in %.1f s", failure, pause)
            self._retry_at[slot] = now + pause

    def _stop_all(self) -> None:
        for worker in self._running:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: uvicorn finishes requests in flight
        deadline = time.monotonic() + self.spec.timeout_graceful_shutdown + 5
        for worker in self._running:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if self.on_worker_exit is not None and worker.process.pid is not None:
                self.on_worker_exit(worker.process.pid)
