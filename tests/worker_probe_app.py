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
