"""Running the API: uvicorn with N worker processes (DESIGN.md, "API: uvicorn with several
workers"), for ``deepclick serve --workers N``.

Workers are *spawned* fresh interpreters (:mod:`serving.workers`, one ``SO_REUSEPORT`` socket
each) that import the app by its import string, so the settings travel to them in one environment
variable as JSON (the parent's settings, CLI overrides included, exactly), and each worker builds
its own app with :func:`app_from_environment` — its own release watcher, model and connections —
while the index, embeddings and entity tables are the same mapped files for all of them. With
more than one worker the Prometheus client runs in multiprocess mode (a fresh folder in
``PROMETHEUS_MULTIPROC_DIR``) so ``/metrics`` on any worker reports the sum over all of them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import tempfile

import uvicorn
from fastapi import FastAPI

from deepclick.settings import Settings

from .metrics import MULTIPROC_ENV
from .workers import WorkerSpec, WorkerSupervisor

SETTINGS_ENV = "DEEPCLICK_SERVING_SETTINGS_JSON"
APP_FACTORY = "serving.server:app_from_environment"


def app_from_environment() -> FastAPI:
    """The app of one worker, from the settings :func:`run` put in the environment."""
    from .app import create_app

    # A fatal signal (a native crash in a library) prints every thread's traceback to stderr
    # instead of dying silently (issue 12: a segfault left nothing in the log).
    faulthandler.enable()
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(
            f"{SETTINGS_ENV} is not set: start the API with serving.server.run (deepclick serve)"
        )
    return create_app(Settings(**json.loads(raw)))


def run(settings: Settings, workers: int | None = None, *, log_level: str = "info") -> None:
    """Serve the API on ``settings.serving.host:port`` with ``workers`` processes (default
    ``settings.serving.workers``) until interrupted."""
    workers = workers or settings.serving.workers
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    serve(WorkerSpec(APP_FACTORY, settings.serving.host, settings.serving.port, log_level), workers)


def serve(spec: WorkerSpec, workers: int) -> None:
    """Serve ``spec.app_factory`` with ``workers`` processes: one process serves in this one (as
    ``uvicorn.run`` does); more are supervised, each on its own ``SO_REUSEPORT`` socket
    (:mod:`serving.workers`), with Prometheus in multiprocess mode across them."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        uvicorn.run(
            spec.app_factory,
            factory=True,
            host=spec.host,
            port=spec.port,
            log_level=spec.log_level,
            access_log=False,  # one log line per request costs more than the ranking's sort
            timeout_graceful_shutdown=spec.timeout_graceful_shutdown,
        )
        return
    metrics_dir = None
    if MULTIPROC_ENV not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="deepclick-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        WorkerSupervisor(spec, workers, on_worker_exit=_forget_worker_gauges).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)


def _forget_worker_gauges(pid: int) -> None:
    """A dead worker's live gauges leave ``/metrics`` (prometheus-client's multiprocess rule)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
