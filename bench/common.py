"""What every benchmark shares: latency percentiles, per-process memory from /proc, a rich table
on the console and a JSON record in ``bench/results/<name>.json`` for later comparison."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean of per-call durations given in seconds, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def memory_kb(pid: int, path: Path | None = None) -> dict[str, int]:
    """The kernel's accounting of a process (kB): totals from ``smaps_rollup``, or, given ``path``,
    the sum over that file's mappings in ``smaps``. PSS splits each shared page between the
    processes mapping it, so summing PSS over workers gives their real combined footprint."""
    source = "smaps" if path is not None else "smaps_rollup"
    totals: dict[str, int] = {}
    inside = path is None
    for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
            inside = path is None or line.rstrip().endswith(str(path))
        elif inside and line.rstrip().endswith(" kB"):
            totals[head[:-1]] = totals.get(head[:-1], 0) + int(line.split()[1])
    return totals


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def print_table(
    title: str, rows: Sequence[Mapping[str, Any]], console: Console | None = None
) -> None:
    """One rich table; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "name") else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    if console is None:  # not a terminal (a log file): wide enough that columns are not cut
        console = Console() if sys.stdout.isatty() else Console(width=220)
    console.print(table)


def write_json(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the payload, the time and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def _children() -> dict[int, list[int]]:
    """Every live process's children, from ``/proc/<pid>/stat``."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def _rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory of this process and of its descendants (Spark's JVM, workers),
    sampled from ``/proc`` by a background thread and kept per named phase.

    ``with peak.phase("features"): ...`` then ``peak.phases["features"]`` →
    ``{"python_mb": ..., "children_mb": ..., "total_mb": ...}`` (each the peak within the phase).
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.phases: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            self._current = name
            self.phases[name] = {"python_mb": 0.0, "children_mb": 0.0, "total_mb": 0.0}
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._current = None

    def sample(self) -> None:
        me = os.getpid()
        tree = _children()
        descendants, todo = [], list(tree.get(me, []))
        while todo:
            pid = todo.pop()
            descendants.append(pid)
            todo += tree.get(pid, [])
        python = _rss_mb(me)
        children = sum(_rss_mb(pid) for pid in descendants)
        with self._lock:
            if self._current is None:
                return
            peak = self.phases[self._current]
            peak["python_mb"] = max(peak["python_mb"], python)
            peak["children_mb"] = max(peak["children_mb"], children)
            peak["total_mb"] = max(peak["total_mb"], python + children)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def similarity_providers(root: Path, version: str) -> tuple[Any, Any]:
    """The two-tower score providers of D for a bench that retrains the ranker: those its fit
    rows read (the daily run's ranker trained on them) and those D and serving read. They are
    two when the served towers were refitted on the whole window (``lifecycle.refit_towers``:
    the fit's are ``artifacts/ranker_embeddings/<v>``), else one object twice. Scoring D with
    a ranker trained on the first goes through ``models.ranker.train.on_served_scores``; reading
    the served ones for the fit rows would give scores that know the ranker's labels."""
    from candidates.store import read_embeddings
    from deepclick import layout
    from deepclick.publish import NotPublishedError, resolve
    from models.ranker.similarity import EmbeddingSimilarity

    served_folder = resolve(layout.embeddings_dir(root), version, what="embeddings")
    served = EmbeddingSimilarity(read_embeddings(served_folder))
    try:
        fit_folder = resolve(layout.ranker_embeddings_dir(root), version, what="ranker embeddings")
    except NotPublishedError:
        return served, served
    return EmbeddingSimilarity(read_embeddings(fit_folder)), served


def add_generated_state_arguments(parser: argparse.ArgumentParser) -> None:
    """``--root``, ``--date`` and ``--dataset`` of a bench that reads day D's state of a
    generated dataset (its features, evaluation and the world's truth)."""
    parser.add_argument("--root", type=Path, required=True, help="state folder of the dataset")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--dataset", default="marketplace")


def generated_world(root: Path, dataset: str, bench: str) -> Any:
    """The world of ``dataset`` under ``root``; the bench exits naming what is missing when the
    dataset was not generated (a real log has no truth to compare with)."""
    from deepclick import layout
    from pipelines.retrieval_eval import _world

    world = _world(layout.truth_dir(root, dataset))
    if world is None:
        raise SystemExit(f"no world.npz under {root}: {bench} needs generated data")
    return world


def evaluated_predictions(root: Path, version: str, labels: np.ndarray) -> Any:
    """D's per-row scores as D's evaluation stored them (the ranker and its peers,
    ``models.evaluation.report.PREDICTIONS_FILE``); refused unless they are the rows of
    ``labels`` in that order, since a pairing with other rows would judge noise."""
    import pandas as pd

    from deepclick import layout
    from models.evaluation.report import PREDICTIONS_FILE

    stored = pd.read_parquet(layout.evaluations_dir(root) / version / "ranking" / PREDICTIONS_FILE)
    if not np.array_equal(stored["label"].to_numpy(), np.asarray(labels)):
        raise SystemExit("the evaluation's predictions are not D's evaluation rows in order")
    return stored
