"""MLflow tracking of the daily runs (DESIGN.md, "MLflow: runs, registered models, aliases").

One experiment (``settings.mlflow.experiment``); one parent run per daily run and one nested run
per stage, skipped stages included (tagged as such, so the history shows what a re-run reused).
The stage logic never calls MLflow: the runner (``lifecycle/daily.py``) hands each finished stage
to a :class:`Tracker` as a :class:`StageRecord`. :class:`NullTracker` is the tracker when
tracking is off, so the runner has no ``if mlflow`` branches.

The embedded default is a SQLite store under ``root`` with an explicit artifact folder
(``settings.mlflow_artifact_location``); a tracking-server URI works the same, since everything
goes through one :class:`mlflow.MlflowClient` bound to ``settings.mlflow_tracking_uri`` (no
process-global ``mlflow.set_tracking_uri``, no active-run stack).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from deepclick.settings import Settings
from lifecycle.registry import MlflowRegistry, ModelKind

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RUN_KEY_TAG = "deepclick.run_key"
STAGE_TAG = "deepclick.stage"
STATUS_TAG = "deepclick.status"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000
BATCH = 100

StageStatus = Literal["ran", "skipped", "failed"]


@dataclass
class StageRecord:
    """What a stage did, in the terms a tracker logs: the runner fills it, the tracker writes it."""

    name: str
    status: StageStatus
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    """Per-step series (training curves): name → values of step 0, 1, …"""
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    """(artifact folder, file or folder to log into it)."""
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@functools.cache
def code_version() -> dict[str, str]:
    """The package version and, when the code sits in a git checkout, its commit."""
    try:
        version = importlib.metadata.version("deepclick")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    found = {"package_version": version}
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            found["git_commit"] = commit
        except (OSError, subprocess.SubprocessError):
            pass
    return found


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``a.b.c`` keys (how settings sections become MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers among (nested) values, flattened: counts and metrics of a manifest."""
    found: dict[str, float] = {}
    for key, value in flatten(values, prefix).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(float(value)):
            found[_metric_key(key)] = float(value)
    return found


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class Tracker:
    """The tracking interface of the runner; this base class records nothing (tracking off)."""

    enabled = False

    def start(
        self, *, date: str, dataset: str, run_key: str, params: Mapping[str, Any]
    ) -> str | None:
        """Open (or re-open, for the next task of the same Airflow run) the daily parent run."""
        return None

    def stage(self, record: StageRecord) -> str | None:
        """Log one stage as a nested run; return its run id."""
        return None

    def register(
        self, kind: ModelKind, stage_run_id: str | None, folder: Path, tags: Mapping[str, Any]
    ) -> str | None:
        """Log a model folder and register it as the new ``challenger``; return its version."""
        return None

    def decision(self, record: Mapping[str, Any]) -> None:
        """Mirror a promotion or refusal of the ledger (tags, params, aliases)."""

    def finish(self, status: Literal["FINISHED", "FAILED"], metrics: Mapping[str, float]) -> None:
        """Close the parent run."""


NullTracker = Tracker


class MlflowTracker(Tracker):
    """A :class:`Tracker` writing to MLflow through one client (SQLite store or server)."""

    enabled = True

    def __init__(self, settings: Settings, client: MlflowClient | None = None) -> None:
        from mlflow import MlflowClient

        uri = settings.mlflow_tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if settings.mlflow.tracking_uri is None:  # the embedded store belongs to this root
            relocate_embedded_store(
                Path(uri.removeprefix("sqlite:///")),
                settings.mlflow.experiment,
                settings.mlflow_artifact_location,
            )
        self.client = client or MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.settings = settings
        self.experiment_id = ensure_experiment(
            self.client, settings.mlflow.experiment, settings.mlflow_artifact_location
        )
        self.registry = MlflowRegistry(self.client, settings.mlflow)
        self.parent_id: str | None = None
        self._base_tags: dict[str, str] = {}

    # -- parent run --------------------------------------------------------------------------

    def start(
        self, *, date: str, dataset: str, run_key: str, params: Mapping[str, Any]
    ) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
            max_results=1,
        )
        self._base_tags = {"deepclick.date": date, "deepclick.dataset": dataset}
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"daily {date}",
            tags={RUN_KEY_TAG: run_key, "deepclick.kind": "daily", **self._base_tags},
        )
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, {"date": date, "dataset": dataset, **params})
        return self.parent_id

    def finish(self, status: Literal["FINISHED", "FAILED"], metrics: Mapping[str, float]) -> None:
        if self.parent_id is None:
            return
        self._log_metrics(self.parent_id, metrics)
        self.client.set_terminated(self.parent_id, status=status)

    # -- stages ------------------------------------------------------------------------------

    def stage(self, record: StageRecord) -> str | None:
        if self.parent_id is None:
            raise RuntimeError("Tracker.start must open the daily run before its stages")
        tags = {
            PARENT_TAG: self.parent_id,
            STAGE_TAG: record.name,
            STATUS_TAG: record.status,
            **self._base_tags,
            **record.tags,
        }
        if record.error:
            tags["deepclick.error"] = record.error[:5000]
        run = self.client.create_run(
            self.experiment_id, run_name=f"{record.name} ({record.status})", tags=tags
        )
        run_id = run.info.run_id
        self._log_params(run_id, record.params)
        self._log_metrics(run_id, {"seconds": record.seconds, **record.metrics})
        self._log_curves(run_id, record.curves)
        for name, path in record.artifacts:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), name)
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), name)
        self.client.set_terminated(
            run_id, status="FAILED" if record.status == "failed" else "FINISHED"
        )
        # the parent shows every stage's timing at a glance
        self._log_metrics(self.parent_id, {f"{record.name}.seconds": record.seconds})
        return run_id

    def register(
        self, kind: ModelKind, stage_run_id: str | None, folder: Path, tags: Mapping[str, Any]
    ) -> str | None:
        if stage_run_id is None:
            raise RuntimeError(f"registering the {kind}: its stage was not logged")
        self.client.log_artifacts(stage_run_id, str(folder), kind)
        version = self.registry.register(kind, stage_run_id, kind, tags)
        self.client.set_tag(stage_run_id, f"deepclick.registered.{kind}", version)
        return version

    def decision(self, record: Mapping[str, Any]) -> None:
        self.registry.record(record)
        if self.parent_id is None:
            return
        self.client.set_tag(self.parent_id, "deepclick.decision", record["action"])
        self.client.set_tag(self.parent_id, "deepclick.decision_id", record["id"])
        self.client.set_tag(
            self.parent_id, "deepclick.decision_reason", str(record.get("reason", ""))[:5000]
        )
        metrics = record.get("metrics", {})
        self._log_metrics(
            self.parent_id,
            {
                **numeric(metrics.get("challenger") or {}, "challenger."),
                **numeric(metrics.get("champion") or {}, "champion."),
            },
        )

    # -- batching ----------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(_metric_key(k)[:250], _param_text(v)) for k, v in sorted(flatten(params).items())
        ]
        for chunk in _chunks(items, BATCH):
            self.client.log_batch(run_id, params=chunk)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in numeric(metrics).items()]
        for chunk in _chunks(items, BATCH * 10):
            self.client.log_batch(run_id, metrics=chunk)

    def _log_curves(self, run_id: str, curves: Mapping[str, Iterable[float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(name), float(v), now, step)
            for name, values in curves.items()
            for step, v in enumerate(values)
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        for chunk in _chunks(items, BATCH * 10):
            self.client.log_batch(run_id, metrics=chunk)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else _json(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str, sort_keys=True)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


RELOCATED_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate_embedded_store(db: Path, experiment: str, artifact_location: str) -> int:
    """Point the embedded SQLite store's artifact URIs at this state root; return rows changed.

    MLflow records absolute artifact locations (the experiment's, each run's, each model
    version's). A state root that was copied or moved would otherwise keep writing artifacts into
    the old root — or fail where it is gone (issue 12, item 8). Only the embedded store is
    rewritten: it lives inside the root, so its paths are the root's by definition; a tracking
    server keeps its own artifact store.
    """
    if not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        row = connection.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
        if row is None or str(row[0]).rstrip("/") == artifact_location.rstrip("/"):
            return 0
        old = str(row[0]).rstrip("/")
        if not old.startswith("file:"):
            return 0
        new = artifact_location.rstrip("/")
        changed = 0
        for old_prefix, new_prefix in ((old, new), (urlparse(old).path, urlparse(new).path)):
            for table, column in RELOCATED_COLUMNS:
                columns = {c[1] for c in connection.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    continue
                changed += connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ?",
                    (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix),
                ).rowcount
    log.warning("the state root moved: MLflow artifacts now go to %s (was %s)", new, old)
    return changed


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` when it does not exist.

    An existing experiment keeps its own artifact location (MLflow cannot move it); a different
    one is reported, since artifacts then land elsewhere than the settings say.
    """
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        if existing.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.warning(
                "MLflow experiment %r stores artifacts in %s, not %s (set when it was created)",
                name,
                existing.artifact_location,
                artifact_location,
            )
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by a concurrent task: use that one
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return again.experiment_id


def make_tracker(settings: Settings) -> Tracker:
    """The tracker the settings ask for: MLflow when ``mlflow.enabled``, else a silent one."""
    return MlflowTracker(settings) if settings.mlflow.enabled else NullTracker()
