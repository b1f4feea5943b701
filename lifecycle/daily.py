"""``deepclick run`` / ``deepclick backfill`` and the Airflow tasks: the daily retraining run.

For day D the run goes through ``lifecycle/stages.py`` in order — ingest, features, towers, embed,
index, ranker, evaluate, gate, publish — and keeps a run ledger,
``<root>/runs/<YYYYMMDD>/stages.json``, with each stage's fingerprint (a hash of its upstream
manifests or source files, its settings and the package version) and the folder it published. A
re-run skips a stage whose fingerprint is unchanged and whose recorded output still verifies
against its manifest, and redoes the rest — so re-running a finished day changes nothing, and a
day that failed in the middle resumes where it stopped.

Every stage publishes atomically, so a failure leaves everything published before it intact; the
release that serving loads moves only in the last stage, after the gate passed. The exception of
a failed stage is :class:`StageFailed`, which names it.

MLflow never appears here directly: each finished stage is handed to a
:class:`lifecycle.tracking.Tracker` (one parent run per daily run, one nested run per stage).
The same code runs one stage alone (:func:`run_stage`) for a per-stage command (``deepclick
features|towers|embed|index --date D``), an Airflow task or the spark-submit driver
(``deepclick_cli/spark_stage.py``): one code path, so each of them writes the same ledger entry,
skips the same unchanged stage and refuses the same republishing under serving. An Airflow task
judges its success from the ledger entry (:func:`confirm_stage`), not from an exit status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deepclick import layout
from deepclick.errors import DeepclickError
from deepclick.layout import RELEASE_FILE
from deepclick.publish import (
    IntegrityError,
    NotPublishedError,
    current_version,
    verify,
)
from deepclick.settings import LifecycleSettings, Settings, SettingsError, load_settings
from lifecycle.registry import find_decision
from lifecycle.stages import (
    STAGE_NAMES,
    STAGES,
    DayContext,
    Outcome,
    Stage,
    get_stage,
    relative,
)
from lifecycle.tracking import StageRecord, Tracker, code_version, flatten, make_tracker, numeric

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

LEDGER_FILE = "stages.json"
KEPT_INVOCATIONS = 50


class StageFailed(DeepclickError, RuntimeError):
    """A stage of the daily run failed; everything published before it is intact."""

    def __init__(self, stage: str, date: dt.date, cause: BaseException | str) -> None:
        super().__init__(f"stage '{stage}' failed for {date.isoformat()}: {cause}")
        self.stage = stage
        self.date = date


class ServingPinnedError(DeepclickError, RuntimeError):
    """A stage would republish a folder that the serving release reads."""


class StageNotConfirmed(DeepclickError, RuntimeError):
    """The run ledger does not confirm that a task's stage completed."""


# --------------------------------------------------------------------------- reports


@dataclass
class StageResult:
    """One stage of one invocation: what happened, how long it took, what it published."""

    name: str
    status: str
    """``ran``, ``skipped`` (unchanged, output verified) or ``failed``."""
    seconds: float
    note: str = ""
    reason: str = ""
    fingerprint: str | None = None
    output: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    registered_version: str | None = None


@dataclass
class DailyReport:
    """What a daily run did: each stage, the gate's decision and the release serving afterwards."""

    date: str
    dataset: str
    stages: list[StageResult] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    release: str | None = None
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def promoted(self) -> bool | None:
        return None if self.decision is None else self.decision.get("action") == "promoted"

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the run ledger


def runs_dir(settings: Settings) -> Path:
    return layout.runs_dir(settings.root)


class RunLedger:
    """``<root>/runs/<YYYYMMDD>/stages.json``: the last outcome of every stage of one day.

    Written whole by atomic rename after every stage, so a reader (an Airflow task confirming its
    stage) never sees half of it. :meth:`locked` serialises runs of the same day across processes.
    """

    def __init__(self, settings: Settings, date: dt.date) -> None:
        self.settings = settings
        self.folder = layout.DayLayout(settings.root, date).run
        self.path = self.folder / LEDGER_FILE
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text())
            if self.path.is_file()
            else {"date": date.isoformat(), "stages": {}, "invocations": []}
        )

    @classmethod
    @contextlib.contextmanager
    def locked(cls, settings: Settings, date: dt.date) -> Iterator[RunLedger]:
        folder = layout.DayLayout(settings.root, date).run
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield cls(settings, date)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entry(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def record(self, stage: str, entry: Mapping[str, Any]) -> None:
        self.data["stages"][stage] = dict(entry)
        self._write()

    def note_invocation(self, run_key: str, **details: Any) -> None:
        runs = [r for r in self.data["invocations"] if r.get("run_key") != run_key]
        runs.append({"run_key": run_key, "at": _now(), **details})
        self.data["invocations"] = runs[-KEPT_INVOCATIONS:]
        self._write()

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{LEDGER_FILE}.{uuid.uuid4().hex[:8]}"
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- one stage


def fingerprint(stage: Stage, ctx: DayContext) -> tuple[str, dict[str, Any]]:
    """The stage's fingerprint and the inputs it was computed from.

    Upstream manifests carry their checksums and creation time, so a republished input — even
    with the same content — changes the fingerprint of every stage downstream of it.
    """
    inputs = stage.inputs(ctx)
    payload = {
        "stage": stage.name,
        "package": code_version()["package_version"],
        "settings": stage.config(ctx),
        "inputs": inputs,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), inputs


def _reuse(
    stage: Stage, ctx: DayContext, entry: dict[str, Any] | None, digest: str
) -> tuple[bool, str]:
    """Whether a recorded outcome can stand for this run, and why (or why not)."""
    if entry is None:
        return False, "first run of this stage for the day"
    if entry.get("status") != "done":
        return False, f"last attempt failed: {entry.get('error', '?')}"
    if entry.get("fingerprint") != digest:
        return False, "inputs, settings or code version changed"
    if entry.get("output"):
        try:
            verify(ctx.settings.root / entry["output"], entry["manifest"])
        except (IntegrityError, NotPublishedError) as exc:
            return False, f"recorded output no longer verifies: {exc}"
    if stage.still_valid is not None:
        problem = stage.still_valid(ctx, entry)
        if problem:
            return False, problem
    return True, "inputs and settings unchanged, output verified"


def serving_folders(settings: Settings) -> dict[Path, str]:
    """The folders the serving release reads (features, embeddings, index, ranker) → release."""
    releases = layout.releases_dir(settings.root)
    version = current_version(releases)
    path = releases / str(version) / RELEASE_FILE
    if version is None or not path.is_file():
        return {}
    release = json.loads(path.read_text())
    found: dict[Path, str] = {}
    for part in ("feature_spec", "embeddings", "index", "ranker"):
        folder = Path(str(release.get(part, {}).get("folder", "")))
        if str(folder):
            folder = folder if folder.is_absolute() else settings.root / folder
            found[folder.resolve()] = version
    return found


def _guard_serving(stage: Stage, ctx: DayContext) -> None:
    """Refuse to republish a folder the serving release reads: the release checks each
    component's manifest digest, so republishing it would break serving at its next reload — and
    if the new model were then refused, nothing valid would be left to serve."""
    pinned = serving_folders(ctx.settings)
    for name in stage.protects:
        folder = Path(getattr(ctx, name)).resolve()
        if folder in pinned:
            raise ServingPinnedError(
                f"re-running stage '{stage.name}' would republish {folder}, which serving release "
                f"{pinned[folder]} reads; point serving at another release first "
                "(releases/CURRENT) or re-run a later day"
            )


def _input_versions(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Data versions for the tracker: each upstream manifest's version (and creation time)."""
    found: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Mapping) and "version" in value:
            found[f"input.{name}.version"] = value["version"]
            found[f"input.{name}.created_at"] = value.get("created_at")
        elif isinstance(value, list):
            found[f"input.{name}.count"] = len(value)
            dates = [v.get("version") for v in value if isinstance(v, Mapping)]
            if dates and all(dates):
                found[f"input.{name}.versions"] = ",".join(str(d) for d in dates)
        elif name == "source":
            found["input.source"] = value
    return found


def _execute(
    stage: Stage,
    ctx: DayContext,
    ledger: RunLedger,
    tracker: Tracker,
    run_key: str,
    *,
    force: bool = False,
) -> StageResult:
    """Run or skip one stage, record it in the ledger, then hand it to the tracker.

    ``force`` runs it even when its recorded outcome could stand (the serving guard still
    applies). A stage whose inputs cannot be read cannot be shown to be a skip: the serving guard
    is asked first, so a refusal to republish what serving reads wins over the missing input."""
    started = time.perf_counter()
    digest: str | None = None
    inputs: dict[str, Any] = {}
    ctx.registered = {
        s.registers: (ledger.entry(s.name) or {}).get("registered_version")
        for s in STAGES
        if s.registers
    }
    try:
        try:
            digest, inputs = fingerprint(stage, ctx)
        except Exception:
            _guard_serving(stage, ctx)
            raise
        previous = ledger.entry(stage.name)
        skip, reason = _reuse(stage, ctx, previous, digest)
        if skip and force:
            skip, reason = False, "forced (--force)"
        outcome: Outcome | None = None
        adopted = False
        if not skip and not force and stage.adopt is not None and previous is None:
            outcome = stage.adopt(ctx)
            if outcome is not None:
                adopted, reason = True, "published earlier from the same unchanged source"
        if not skip and outcome is None:
            _guard_serving(stage, ctx)
            outcome = stage.run(ctx, inputs)
    except ServingPinnedError as exc:  # refused before doing anything: the record stands
        raise StageFailed(stage.name, ctx.date, exc) from exc
    except Exception as exc:
        seconds = time.perf_counter() - started
        ledger.record(
            stage.name,
            {
                "status": "failed",
                "last": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "finished_at": _now(),
                "checked_at": _now(),
                "seconds": round(seconds, 3),
                "run_key": run_key,
            },
        )
        with contextlib.suppress(Exception):  # tracking must not hide the stage's own error
            tracker.stage(
                StageRecord(
                    stage.name,
                    "failed",
                    seconds,
                    params={"fingerprint": digest, **_input_versions(inputs)},
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
        raise StageFailed(stage.name, ctx.date, exc) from exc

    seconds = time.perf_counter() - started
    root = ctx.settings.root
    if skip:
        assert previous is not None
        entry = {**previous, "last": "skipped", "checked_at": _now(), "run_key": run_key}
        status = "skipped"
    else:
        assert outcome is not None
        status = "skipped" if adopted else "ran"
        entry = {
            "status": "done",
            "last": status,
            "fingerprint": digest,
            "output": None if outcome.output is None else relative(outcome.output, root),
            "manifest": outcome.manifest_name,
            "finished_at": _now(),
            "checked_at": _now(),
            "seconds": round(seconds, 3),
            "note": outcome.note,
            "metrics": numeric(outcome.metrics),
            "extra": outcome.extra,
            "run_key": run_key,
            "produced_by": run_key,
            "registered_version": None,
        }
    ledger.record(stage.name, entry)
    result = StageResult(
        stage.name,
        status,
        seconds,
        note=entry.get("note", ""),
        reason=reason,
        fingerprint=digest,
        output=entry.get("output"),
        metrics=dict(entry.get("metrics", {})),
    )
    try:
        _track(
            stage, ctx, ledger, tracker, entry, outcome if status == "ran" else None, result, inputs
        )
    except Exception as exc:
        raise StageFailed(
            stage.name, ctx.date, f"its output is published but tracking failed: {exc}"
        ) from exc
    return result


def _track(
    stage: Stage,
    ctx: DayContext,
    ledger: RunLedger,
    tracker: Tracker,
    entry: dict[str, Any],
    outcome: Outcome | None,
    result: StageResult,
    inputs: Mapping[str, Any],
) -> None:
    """Log the stage, register its model if not yet registered, mirror its decision."""
    if not tracker.enabled:
        return
    params = {
        "fingerprint": result.fingerprint,
        "reason": result.reason,
        **_input_versions(inputs),
        **flatten(stage.config(ctx), "settings."),
        **code_version(),
    }
    record = StageRecord(
        stage.name,
        "ran" if outcome is not None else "skipped",
        result.seconds,
        params=params,
        metrics=result.metrics if outcome is not None else {},
        curves=outcome.curves if outcome is not None else {},
        artifacts=outcome.artifacts if outcome is not None else [],
        tags={"deepclick.produced_by": str(entry.get("produced_by"))} if outcome is None else {},
    )
    result.mlflow_run_id = tracker.stage(record)
    if stage.registers and entry.get("output") and not entry.get("registered_version"):
        version = tracker.register(
            stage.registers,
            result.mlflow_run_id,
            ctx.settings.root / entry["output"],
            {
                "deepclick.date": ctx.date.isoformat(),
                "deepclick.version": ctx.version,
                "deepclick.folder": entry["output"],
                "deepclick.fingerprint": result.fingerprint,
            },
        )
        entry["registered_version"] = version
        ledger.record(stage.name, entry)
    result.registered_version = entry.get("registered_version")
    extra = entry.get("extra", {})
    if extra.get("decision_id") and not extra.get("mirrored"):
        decision = (outcome.decision if outcome is not None else None) or find_decision(
            ctx.settings, extra["decision_id"]
        )
        if decision is not None:
            tracker.decision(decision)
            entry["extra"] = {**extra, "mirrored": True}
            ledger.record(stage.name, entry)


# --------------------------------------------------------------------------- context


def resolve_source(
    settings: Settings, dataset: str, date: dt.date, source: Path | str | None
) -> Path:
    """The raw logs of D: ``source`` (else ``lifecycle.source``, else ``<raw>/<dataset>``); when
    that folder holds a ``<YYYY-MM-DD>`` sub-folder, that day folder."""
    from pipelines.specs import load_spec

    base = Path(source) if source else settings.lifecycle.source
    if base is None:
        base = layout.raw_source(settings.root, load_spec(dataset).name)
    base = base.expanduser().resolve()
    day = base / date.isoformat()
    return day if day.is_dir() else base


def make_context(
    settings: Settings,
    date: dt.date | str,
    *,
    dataset: str | None = None,
    source: Path | str | None = None,
    spark: SparkSession | None = None,
) -> DayContext:
    day = layout.parse_date(date)
    name = dataset or settings.lifecycle.dataset
    return DayContext(settings, day, name, resolve_source(settings, name, day, source), spark)


def _run_params(settings: Settings, ctx: DayContext) -> dict[str, Any]:
    sections = settings.model_dump(mode="json", exclude={"root"})
    return {
        "source": str(ctx.source),
        "root": str(settings.root),
        **code_version(),
        **flatten(sections, "settings."),
    }


# --------------------------------------------------------------------------- whole runs


def run_daily(
    settings: Settings,
    date: dt.date | str,
    *,
    dataset: str | None = None,
    source: Path | str | None = None,
    spark: SparkSession | None = None,
    console: Console | None = None,
    stages: Sequence[str] | None = None,
    tracker: Tracker | None = None,
    run_key: str | None = None,
    force: bool = False,
) -> DailyReport:
    """Run (or resume) the daily run of ``date``; return what every stage did.

    Args:
        dataset: dataset spec (default ``lifecycle.dataset``).
        source: raw logs of D, or a folder of day folders (default ``lifecycle.source``, else
            ``<root>/raw/<dataset>/<YYYY-MM-DD>``).
        spark: a session to reuse (created from ``settings.spark`` when a Spark stage needs one).
        stages: a subset of the stages, in the usual order (default: all).
        tracker: where stages are logged (default: MLflow when ``mlflow.enabled``).
        force: run the chosen stages even where their recorded outcome could stand.

    Raises:
        StageFailed: a stage failed; the message names it. Everything published before it stays,
            and the serving release is unchanged.
    """
    console = console or Console()
    ctx = make_context(settings, date, dataset=dataset, source=source, spark=spark)
    chosen = [get_stage(n) for n in (stages or STAGE_NAMES)]
    chosen.sort(key=lambda s: STAGE_NAMES.index(s.name))
    run_key = run_key or f"daily-{ctx.version}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    report = DailyReport(ctx.date.isoformat(), ctx.dataset)
    with RunLedger.locked(settings, ctx.date) as ledger:
        tracker = tracker or make_tracker(settings)
        report.mlflow_run_id = tracker.start(
            date=report.date,
            dataset=ctx.dataset,
            run_key=run_key,
            params=_run_params(settings, ctx),
        )
        ledger.note_invocation(
            run_key, mlflow_run_id=report.mlflow_run_id, stages=[s.name for s in chosen]
        )
        console.rule(f"daily run {report.date} · {ctx.dataset} · {ctx.source}")
        try:
            for stage in chosen:
                with console.status(f"[bold]{stage.name}[/bold] …"):
                    result = _execute(stage, ctx, ledger, tracker, run_key, force=force)
                report.stages.append(result)
                _print_stage(console, result)
        except StageFailed as exc:
            console.print(Text(f"✗ {exc}", style="red"))
            console.print("  everything published before it is intact; serving is unchanged")
            with contextlib.suppress(Exception):
                tracker.finish("FAILED", {"seconds": time.perf_counter() - started})
            raise
        report.decision = _recorded_decision(settings, ledger)
        report.release = current_version(layout.releases_dir(settings.root))
        report.seconds = time.perf_counter() - started
        tracker.finish(
            "FINISHED",
            {
                "seconds": report.seconds,
                "stages_ran": sum(s.status == "ran" for s in report.stages),
                "stages_skipped": sum(s.status == "skipped" for s in report.stages),
            },
        )
    print_summary(console, report)
    return report


def _recorded_decision(settings: Settings, ledger: RunLedger) -> dict[str, Any] | None:
    entry = ledger.entry("publish") or {}
    decision_id = entry.get("extra", {}).get("decision_id")
    return find_decision(settings, decision_id) if decision_id else None


def run_backfill(
    settings: Settings,
    start: dt.date | str,
    end: dt.date | str,
    **kwargs: Any,
) -> list[DailyReport]:
    """The daily run of every day from ``start`` to ``end`` (inclusive), oldest first.

    A day with fewer than ``features.min_train_days`` days of events before it is only ingested
    (there is nothing to train on yet); the days after it train on it. Stops at the first failure.
    Keyword arguments are those of :func:`run_daily`.
    """
    from pipelines.features.runner import list_partitions, partition_dataset
    from pipelines.specs import load_spec

    first = dt.date.fromisoformat(start) if isinstance(start, str) else start
    last = dt.date.fromisoformat(end) if isinstance(end, str) else end
    if last < first:
        raise ValueError(f"backfill end {last} is before its start {first}")
    reports = []
    name = load_spec(kwargs.get("dataset") or settings.lifecycle.dataset).name
    for offset in range((last - first).days + 1):
        day = first + dt.timedelta(days=offset)
        before = [  # this dataset's days only: a state root may hold several side by side
            p
            for p in list_partitions(layout.events_dir(settings.root))
            if p.day < day and partition_dataset(p) == name
        ]
        enough = len(before) >= settings.features.min_train_days
        report = run_daily(settings, day, stages=None if enough else ("ingest",), **kwargs)
        if not enough:
            report.note = (
                f"ingested only: features need {settings.features.min_train_days} day(s) of "
                f"events before {day}, found {len(before)}"
            )
        reports.append(report)
    return reports


# --------------------------------------------------------------------------- one stage alone


def run_stage(
    settings: Settings,
    date: dt.date | str,
    stage: str,
    *,
    run_key: str,
    dataset: str | None = None,
    source: Path | str | None = None,
    spark: SparkSession | None = None,
    tracker: Tracker | None = None,
    force: bool = False,
    finish: bool | None = None,
) -> StageResult:
    """Run (or skip) one stage of D's daily run — a per-stage command, an Airflow task or the
    spark-submit driver — exactly as :func:`run_daily` runs it: the day's lock, the ledger entry,
    the fingerprint skip, the serving guard and the tracker.

    Tasks of the same Airflow run share ``run_key``, so they log into one MLflow parent run; the
    last stage closes it, a failing stage marks it failed (a retry re-opens it).

    Args:
        force: run the stage even when its recorded outcome could stand.
        finish: close the MLflow parent run after this stage (default: only after the last
            stage; a command that runs one stage on its own closes its run).

    Raises:
        StageFailed: the stage failed; nothing it would have published is visible.
    """
    ctx = make_context(settings, date, dataset=dataset, source=source, spark=spark)
    chosen = get_stage(stage)
    with RunLedger.locked(settings, ctx.date) as ledger:
        tracker = tracker or make_tracker(settings)
        parent = tracker.start(
            date=ctx.date.isoformat(),
            dataset=ctx.dataset,
            run_key=run_key,
            params=_run_params(settings, ctx),
        )
        ledger.note_invocation(run_key, mlflow_run_id=parent, stages=[stage])
        try:
            result = _execute(chosen, ctx, ledger, tracker, run_key, force=force)
        except StageFailed:
            with contextlib.suppress(Exception):
                tracker.finish("FAILED", {})
            raise
        if (stage == STAGE_NAMES[-1]) if finish is None else finish:
            tracker.finish("FINISHED", {})
    log.info("stage %s for %s: %s (%s)", stage, ctx.date, result.status, result.note)
    return result


def confirm_stage(
    settings: Settings, date: dt.date | str, stage: str, *, since: dt.datetime
) -> dict[str, Any]:
    """The ledger entry of ``stage`` for D, checked to show that it completed at or after
    ``since`` and that its published output still matches its manifest.

    This is how an Airflow task decides success: an exit status of 0 from a process that wrote
    nothing (or a spark-submit that lost its driver) must not pass for a finished stage.

    Raises:
        StageNotConfirmed: no entry, a failed entry, a stale entry, or an output that does not
            verify; the message says which.
    """
    day = dt.date.fromisoformat(date) if isinstance(date, str) else date
    get_stage(stage)
    entry = RunLedger(settings, day).entry(stage)
    where = f"stage '{stage}' for {day}"
    if entry is None:
        raise StageNotConfirmed(f"{where}: the run ledger has no entry (the stage never ran)")
    if entry.get("status") != "done":
        raise StageNotConfirmed(f"{where}: the ledger records a failure: {entry.get('error')}")
    checked = dt.datetime.fromisoformat(str(entry.get("checked_at")))
    if checked < since:
        raise StageNotConfirmed(
            f"{where}: the ledger entry dates from {checked.isoformat()}, before this task "
            f"started ({since.isoformat()}); the stage did not report back"
        )
    if entry.get("output"):
        try:
            verify(settings.root / entry["output"], entry["manifest"])
        except (IntegrityError, NotPublishedError) as exc:
            raise StageNotConfirmed(f"{where}: its output does not verify: {exc}") from None
    return entry


def airflow_task(stage: str, date: str, run_key: str) -> dict[str, Any]:
    """What every local task of the ``deepclick_daily`` DAG calls.

    Settings are loaded here, when the task runs (``DEEPCLICK_CONFIG`` / ``DEEPCLICK_*``), never
    when the DAG file is parsed. The return value (pushed to XCom) is the confirmed ledger entry.
    """
    since = dt.datetime.now(dt.UTC)
    settings = load_settings()
    run_stage(settings, date, stage, run_key=run_key)
    entry = confirm_stage(settings, date, stage, since=since)
    return {
        "stage": stage,
        "date": date,
        "last": entry.get("last"),
        "output": entry.get("output"),
        "note": entry.get("note", ""),
    }


SPARK_DRIVER = "deepclick_cli.spark_stage"
"""The module spark-submit runs: an entry point (named here, never imported: the lifecycle layer
does not import upward)."""


def spark_driver_path() -> str:
    """The file of :data:`SPARK_DRIVER`, as spark-submit wants its application."""
    spec = importlib.util.find_spec(SPARK_DRIVER)
    if spec is None or spec.origin is None:  # pragma: no cover - a broken installation
        raise RuntimeError(f"the spark-submit driver {SPARK_DRIVER} is not installed")
    return str(Path(spec.origin).resolve())


def spark_submit_options(
    settings: Settings, stage: str, date: str, run_key: str, config: str | None = None
) -> dict[str, Any]:
    """The SparkSubmitOperator arguments of a Spark stage in the cluster DAG: the driver
    :data:`SPARK_DRIVER` as the application, run as ``--stage S --date D --run-key K``, with the
    connection, ``--conf`` and ``--py-files`` of ``settings.lifecycle``. ``config`` is the
    settings file the driver loads."""
    if stage not in {s.name for s in STAGES if s.uses_spark}:
        raise ValueError(
            f"stage {stage!r} does not run on Spark; only these do: ingest, features, embed"
        )
    from pipelines.spark import LOCAL_ONLY_CONF, spark_conf

    cfg = settings.lifecycle
    conf = {k: v for k, v in spark_conf(settings.spark).items() if k not in LOCAL_ONLY_CONF}
    args = ["--stage", stage, "--date", date, "--run-key", run_key]
    if config:
        args += ["--config", config]
    return {
        "application": spark_driver_path(),
        "application_args": args,
        "conn_id": cfg.spark_submit_conn_id,
        "conf": {**conf, **cfg.spark_submit_conf},
        "py_files": cfg.spark_submit_py_files,
        "env_vars": dict(cfg.spark_submit_env),
        "name": f"deepclick-{stage}-{date}",
    }


def scheduling_settings() -> LifecycleSettings:
    """The lifecycle section for the knobs Airflow fixes when it parses the DAG file (schedule,
    start date, catchup, retries). Only these are read at parse time; an invalid settings file
    falls back to the defaults here (the tasks then fail with the real error at run time), so a
    bad config never makes the DAG disappear from Airflow."""
    try:
        return load_settings().lifecycle
    except SettingsError as exc:
        log.warning("deepclick DAG: using default scheduling settings: %s", exc)
        return LifecycleSettings()


# --------------------------------------------------------------------------- console


STATUS_STYLE = {"ran": "[green]✓ ran[/green]", "skipped": "[cyan]↷ skipped[/cyan]"}


def _print_stage(console: Console, result: StageResult) -> None:
    line = Text.from_markup(STATUS_STYLE.get(result.status, result.status))
    line.pad_right(11 - len(line))
    line.append(f"{result.name:<9}{result.seconds:7.1f} s  ")
    line.append(result.note)
    if result.status == "skipped":
        adopted = result.reason.startswith("published earlier")
        line.append(" (adopted)" if adopted else " (unchanged)", style="dim")
    console.print(line)


def print_summary(console: Console, report: DailyReport) -> None:
    """The table printed after a run: every stage, then the decision and the serving release."""
    table = Table(title=f"daily run {report.date} ({report.dataset})", title_justify="left")
    for column in ("stage", "status", "seconds", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for s in report.stages:
        table.add_row(s.name, s.status, f"{s.seconds:.1f}", Text(s.note))
    table.add_row("total", "", f"{report.seconds:.1f}", Text(report.note))
    console.print(table)
    if report.decision is not None:
        d = report.decision
        line = Text("decision: ").append(str(d["action"]), style="bold")
        console.print(line.append(f" — {d.get('reason', '')}"))
    console.print(f"serving release: {report.release or 'none yet'}")
    if report.mlflow_run_id:
        console.print(f"MLflow run: {report.mlflow_run_id}")
