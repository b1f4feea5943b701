"""Tiny ASGI apps for tests/test_serving_workers.py: each worker says which process it is, or
fails to start. Imported by import string in spawned worker processes."""

from __future__ import annotations

import os

from fastapi import FastAPI


def pid_app() -> FastAPI:
    app = FastAPI()

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    return app


def broken_app() -> FastAPI:
    raise RuntimeError("this app cannot start")


BROKEN_MARKER_ENV = "WORKER_PROBE_BROKEN_MARKER"


def flaky_app() -> FastAPI:
    """:func:`pid_app`, unless the file named by ``$WORKER_PROBE_BROKEN_MARKER`` exists: then
    the start-up fails (a worker replaced while something it needs is broken)."""
    marker = os.environ.get(BROKEN_MARKER_ENV)
    if marker and os.path.exists(marker):
        raise RuntimeError(f"{marker} exists: this worker cannot start")
    return pid_app()
