"""Where library chatter goes, so the console shows what a person needs: the stage table, the
warnings that ask for action, and errors.

TensorFlow's C++ banners (oneDNN, ``cuInit``), absl, Python warnings of the libraries and the
JVM's Spark log lines and progress bars all write to the process's standard error — much of it
from native code or a child process (the Spark JVM inherits the descriptor), out of reach of
Python's ``logging``. :func:`route_library_output` therefore points file descriptor 2 at a log
file under the state root, before any of those libraries start, and keeps deepclick's own
warnings on the console through a logging handler on the original standard error. The console
itself (rich, on standard output) is untouched. ``--verbose`` skips all of this.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

OWN_LOGGERS = ("deepclick", "pipelines", "models", "candidates", "serving", "airflow_dags")
"""Loggers of this project: their warnings and errors stay on the console."""


def logs_dir(root: Path) -> Path:
    return root / "logs"


@dataclass
class LibraryOutput:
    """An active redirection; :meth:`restore` puts standard error back (tests, library use)."""

    path: Path
    saved_fd: int
    console_stream: TextIO
    handlers: list[tuple[logging.Logger, logging.Handler]]

    def restore(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        logging.captureWarnings(False)
        for logger, handler in self.handlers:
            logger.removeHandler(handler)
            handler.close()
        self.console_stream.close()


def route_library_output(root: Path, *, name: str = "deepclick") -> LibraryOutput:
    """Send standard error (and with it every library's output) to
    ``<root>/logs/<name>-<UTC time>-<pid>.log``; keep this project's WARNING+ log records on the
    original standard error. Returns the redirection (its ``path`` is for the one line that
    tells the user where the rest went)."""
    folder = logs_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{name}-{stamp}-{os.getpid()}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    console_stream = os.fdopen(os.dup(saved), "w", buffering=1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)

    handlers: list[tuple[logging.Logger, logging.Handler]] = []
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    root_logger.addHandler(to_file)
    if root_logger.level > logging.INFO or root_logger.level == logging.NOTSET:
        root_logger.setLevel(logging.INFO)
    handlers.append((root_logger, to_file))
    to_console = logging.StreamHandler(console_stream)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for own in OWN_LOGGERS:
        logger = logging.getLogger(own)
        logger.addHandler(to_console)
        handlers.append((logger, to_console))
    logging.captureWarnings(True)  # library warnings become records of the file handler
    return LibraryOutput(path, saved, console_stream, handlers)
