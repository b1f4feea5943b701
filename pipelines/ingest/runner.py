"""``deepclick ingest``: raw files → validated canonical events, quarantine and side snapshots.

The runner reads through the spec, calls the pure checks in ``nodes``, lets Spark write everything
into one hidden run folder, and only then publishes each date partition by atomic rename
(``deepclick.publish``). A failure before that point leaves every published partition untouched;
re-running a date replaces its partition whole. Every input row is accounted for:
``rows_in = rows_written + rows_quarantined + duplicates_dropped + rows_other_dates``. A run that
would quarantine more than the spec's ``max_quarantined_share`` publishes nothing: a wrongly
declared label or time must fail loudly, not leave a dataset of the rows that happened to pass.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from deepclick import layout
from deepclick.errors import DeepclickError
from deepclick.layout import PARTITION_MANIFEST
from deepclick.publish import publishing
from deepclick.settings import Settings
from pipelines.ingest import nodes
from pipelines.ingest.reader import read_raw
from pipelines.spark import get_spark
from pipelines.specs import DatasetSpec


class IngestError(DeepclickError, RuntimeError):
    """The source holds nothing usable for the requested dates."""


@dataclass
class DateCounts:
    rows_written: int = 0
    rows_quarantined: int = 0
    duplicates_dropped: int = 0


@dataclass
class SideCounts:
    rows_in: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0


@dataclass
class IngestReport:
    """What one ingest run read, wrote, rejected and why; also each partition's manifest."""

    dataset: str
    source: str
    start: str
    end: str
    rows_in: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    duplicates_dropped: int = 0
    rows_other_dates: dict[str, int] = field(default_factory=dict)
    per_date: dict[str, DateCounts] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    side_tables: dict[str, SideCounts] = field(default_factory=dict)
    missing_dates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def balanced(self) -> bool:
        accounted = (
            self.rows_written
            + self.rows_quarantined
            + self.duplicates_dropped
            + sum(self.rows_other_dates.values())
        )
        return accounted == self.rows_in


def date_range(start: dt.date, end: dt.date) -> list[str]:
    if end < start:
        raise ValueError(f"end date {end} is before start date {start}")
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _count_by(frame: DataFrame, *keys: str) -> dict[tuple[Any, ...], int]:
    return {
        tuple(row[k] for k in keys): row["count"] for row in frame.groupBy(*keys).count().collect()
    }


def _sum_by_date(totals: dict[tuple[Any, ...], int]) -> dict[Any, int]:
    result: dict[Any, int] = {}
    for (date, _), n in totals.items():
        result[date] = result.get(date, 0) + n
    return result


def _write_by_date(frame: DataFrame, out: Path, order: list[str]) -> None:
    """One Parquet file per date, rows in a fixed order so re-runs write the same content."""
    (
        frame.repartition("date")
        .sortWithinPartitions(*order)
        .write.mode("overwrite")
        .partitionBy("date")
        .parquet(str(out))
    )


def _move_files(src: Path, dst: Path) -> None:
    """Move Spark's data files (not its hidden .crc files) into a staging folder."""
    if not src.is_dir():
        return
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith((".", "_")):
            os.rename(path, dst / path.name)


def _publish_partition(table_dir: Path, date: str, written: Path, manifest: dict[str, Any]) -> None:
    with publishing(
        table_dir,
        date,
        target_name=f"date={date}",
        manifest_name=PARTITION_MANIFEST,
        update_current=False,
    ) as staging:
        _move_files(written / f"date={date}", staging.path)
        staging.manifest.update(manifest)


def _ingest_side_tables(
    spark: SparkSession, spec: DatasetSpec, source: Path, run_dir: Path, snapshot_date: str
) -> tuple[dict[str, SideCounts], list[DataFrame]]:
    counts: dict[str, SideCounts] = {}
    rejected: list[DataFrame] = []
    for name, table in spec.tables.items():
        checked = nodes.check_side_table(read_raw(spark, spec, source, table, name), table)
        checked = checked.persist(StorageLevel.MEMORY_AND_DISK)
        by_valid = _count_by(checked.withColumn("ok", F.col(nodes.REASON) == ""), "ok")
        counts[name] = SideCounts(
            rows_in=sum(by_valid.values()),
            rows_written=by_valid.get((True,), 0),
            rows_quarantined=by_valid.get((False,), 0),
        )
        canonical = nodes.side_to_canonical(checked, name, table)
        key = canonical.columns[0]
        _write_by_date(
            canonical.withColumn("date", F.lit(snapshot_date)), run_dir / f"side_{name}", [key]
        )
        rejected.append(
            checked.filter(F.col(nodes.REASON) != "").select(
                F.col(nodes.SOURCE).alias("source"),
                nodes.raw_record(list(table.columns)).alias("raw"),
                F.col(nodes.REASON).alias("reason"),
                F.lit(snapshot_date).alias("date"),
            )
        )
    return counts, rejected


def run_ingest(
    settings: Settings,
    spec: DatasetSpec,
    source: Path,
    start: dt.date,
    end: dt.date | None = None,
    spark: SparkSession | None = None,
) -> IngestReport:
    """Ingest the rows of ``source`` dated ``start``..``end`` (inclusive; default one day).

    Rows whose time cannot be parsed are quarantined under the first date published. Rows of
    other dates are counted per date in the report and left for the run of their own date. Side
    tables are snapshotted under that first date too.
    """
    end = end or start
    dates = date_range(start, end)
    day_folders = _day_folders(spec, source)
    if day_folders:
        return _ingest_day_folders(settings, spec, source, dates, day_folders, spark)
    spark = spark or get_spark(settings.spark)
    report = IngestReport(dataset=spec.name, source=str(source), start=dates[0], end=dates[-1])
    warehouse = layout.warehouse(settings.root)
    warehouse.mkdir(parents=True, exist_ok=True)
    _refuse_other_datasets(warehouse, spec, dates)
    run_dir = warehouse / f".ingest-{uuid.uuid4().hex[:12]}"
    raw_columns = list(spec.events.columns)
    latest = dt.datetime.now(dt.UTC) + FUTURE_TOLERANCE
    try:
        raw = read_raw(spark, spec, source, spec.events, "events")
        if spec.event_time.row_order:
            raw = nodes.add_row_order(raw)
        checked = nodes.check_events(raw, spec, latest=latest)
        checked = checked.persist(StorageLevel.MEMORY_AND_DISK)
        status = checked.withColumn("ok", F.col(nodes.REASON) == "")
        totals = _count_by(status, "date", "ok")
        present = sorted({d for (d, _), _ in totals.items() if d in dates})
        report.rows_in = sum(totals.values())
        report.missing_dates = [d for d in dates if d not in present]
        if not present:
            found = ", ".join(
                f"{d} ({n} rows)"
                for d, n in sorted((d, n) for d, n in _sum_by_date(totals).items() if d)
            )
            raise IngestError(
                f"no rows of {dates[0]}..{dates[-1]} in {source}; dates found: {found or 'none'}"
            )
        # Rows whose time does not parse have no date of their own: quarantine them with the
        # first date this run publishes, so they are kept once and counted once.
        undated = totals.pop((None, False), 0)
        if undated:
            totals[(present[0], False)] = totals.get((present[0], False), 0) + undated
        checked = checked.withColumn("date", F.coalesce(F.col("date"), F.lit(present[0])))
        valid = checked.filter(F.col(nodes.REASON) == "")
        deduped = nodes.drop_exact_duplicates(valid, raw_columns) if spec.drop_duplicates else valid
        kept = {d: n for (d,), n in _count_by(deduped, "date").items()}
        for (date, ok), n in sorted(totals.items(), key=str):
            if date not in dates:
                report.rows_other_dates[date] = report.rows_other_dates.get(date, 0) + n
                continue
            counts = report.per_date.setdefault(date, DateCounts())
            if ok:
                counts.rows_written = kept.get(date, 0)
                counts.duplicates_dropped = n - counts.rows_written
            else:
                counts.rows_quarantined = n
        report.rows_written = sum(c.rows_written for c in report.per_date.values())
        report.rows_quarantined = sum(c.rows_quarantined for c in report.per_date.values())
        report.duplicates_dropped = sum(c.duplicates_dropped for c in report.per_date.values())
        in_range_rows = report.rows_written + report.rows_quarantined + report.duplicates_dropped

        in_range = F.col("date").isin(dates)
        events = nodes.to_canonical(deduped.filter(in_range), spec)
        _write_by_date(events, run_dir / "events", ["event_time", "event_id"])
        rejected = checked.filter((F.col(nodes.REASON) != "") & in_range)
        reasons = rejected.groupBy(nodes.REASON).count().orderBy(F.desc("count")).limit(20)
        report.quarantine_reasons = {r[nodes.REASON]: r["count"] for r in reasons.collect()}
        _refuse_large_quarantine(spec, report, in_range_rows)
        quarantine = [
            rejected.select(
                F.col(nodes.SOURCE).alias("source"),
                nodes.raw_record(raw_columns).alias("raw"),
                F.col(nodes.REASON).alias("reason"),
                F.col("date"),
            )
        ]
        report.side_tables, side_rejected = _ingest_side_tables(
            spark, spec, source, run_dir, present[0]
        )
        quarantine += side_rejected
        union = quarantine[0]
        for frame in quarantine[1:]:
            union = union.unionByName(frame)
        _write_by_date(union, run_dir / "quarantine", ["source", "raw"])
        checked.unpersist()

        _publish_all(settings, spec, report, run_dir, dates)
        return report
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


FUTURE_TOLERANCE = dt.timedelta(days=1)
"""Event times later than now plus this are quarantined (a broken clock, e.g. dates in 2099)."""


def _refuse_large_quarantine(spec: DatasetSpec, report: IngestReport, rows: int) -> None:
    """Fail (nothing published) when more than ``max_quarantined_share`` of the rows of the
    requested dates were quarantined: a label or time declared wrong, not a few bad lines."""
    share = report.rows_quarantined / rows if rows else 0.0
    if share <= spec.max_quarantined_share:
        return
    reasons = list(report.quarantine_reasons.items())[:3]
    top = "; ".join(f"{n:,} × {reason}" for reason, n in reasons)
    raise IngestError(
        f"dataset spec {spec.name!r}: {report.rows_quarantined:,} of {rows:,} rows of "
        f"{report.start}..{report.end} ({share:.1%}) would be quarantined, more than "
        f"max_quarantined_share {spec.max_quarantined_share:.0%}; nothing was published. Most "
        f"common reasons: {top}. Fix the spec (label values, event time, keys) or raise "
        "max_quarantined_share."
    )


def _refuse_other_datasets(warehouse: Path, spec: DatasetSpec, dates: list[str]) -> None:
    """A day's events partition holds one dataset: refuse to replace another dataset's day."""
    for date in dates:
        manifest = warehouse / "events" / f"date={date}" / PARTITION_MANIFEST
        if not manifest.is_file():
            continue
        held = json.loads(manifest.read_text()).get("dataset")
        if held and held != spec.name:
            raise IngestError(
                f"events of {date} in {warehouse} are already dataset {held!r}; ingesting "
                f"{spec.name!r} there would replace them. Use another state root for "
                f"{spec.name!r} (--config with another root, or DEEPCLICK_ROOT)"
            )


def _day_folders(spec: DatasetSpec, source: Path) -> dict[str, Path]:
    """``<YYYY-MM-DD>`` sub-folders of ``source`` when the events file is not in ``source``
    itself (the layout ``deepclick simulate`` writes), else nothing."""
    if not source.is_dir() or any(p.is_file() for p in source.glob(spec.events.file)):
        return {}
    found = {}
    for child in source.iterdir():
        if child.is_dir() and len(child.name) == 10:
            try:
                dt.date.fromisoformat(child.name)
            except ValueError:
                continue
            found[child.name] = child
    return found


def _ingest_day_folders(
    settings: Settings,
    spec: DatasetSpec,
    source: Path,
    dates: list[str],
    folders: dict[str, Path],
    spark: SparkSession | None,
) -> IngestReport:
    """Each requested day from its own day folder; one report for the range."""
    wanted = [d for d in dates if d in folders]
    if not wanted:
        shown = ", ".join(sorted(folders)[:3]) + (", …" if len(folders) > 3 else "")
        raise IngestError(
            f"no day folder of {dates[0]}..{dates[-1]} in {source}; day folders found: {shown}"
        )
    total = IngestReport(dataset=spec.name, source=str(source), start=dates[0], end=dates[-1])
    for date in wanted:
        day = dt.date.fromisoformat(date)
        part = run_ingest(settings, spec, folders[date], day, spark=spark)
        total.rows_in += part.rows_in
        total.rows_written += part.rows_written
        total.rows_quarantined += part.rows_quarantined
        total.duplicates_dropped += part.duplicates_dropped
        for other, n in part.rows_other_dates.items():
            total.rows_other_dates[other] = total.rows_other_dates.get(other, 0) + n
        total.per_date.update(part.per_date)
        for reason, n in part.quarantine_reasons.items():
            total.quarantine_reasons[reason] = total.quarantine_reasons.get(reason, 0) + n
        for name, counts in part.side_tables.items():
            seen = total.side_tables.setdefault(name, SideCounts())
            seen.rows_in += counts.rows_in
            seen.rows_written += counts.rows_written
            seen.rows_quarantined += counts.rows_quarantined
    total.missing_dates = [d for d in dates if d not in wanted]
    return total


def _publish_all(
    settings: Settings, spec: DatasetSpec, report: IngestReport, run_dir: Path, dates: Iterable[str]
) -> None:
    """Rename every staged partition into place; only reached once all Spark work succeeded."""
    warehouse = layout.warehouse(settings.root)
    run_summary = {
        k: v for k, v in report.to_dict().items() if k not in ("per_date", "side_tables")
    }
    for name, counts in report.side_tables.items():
        _publish_partition(
            warehouse / "side" / name,
            min(report.per_date),
            run_dir / f"side_{name}",
            {
                "dataset": spec.name,
                "source": report.source,
                "counts": asdict(counts),
                "features": spec.table_features(name),
            },
        )
    for date in dates:
        counts = report.per_date.get(date)
        if counts is None:
            continue
        quarantined = counts.rows_quarantined + (
            sum(c.rows_quarantined for c in report.side_tables.values())
            if date == min(report.per_date)
            else 0
        )
        _publish_partition(
            warehouse / "quarantine",
            date,
            run_dir / "quarantine",
            {"dataset": spec.name, "counts": {"rows": quarantined}},
        )
        _publish_partition(
            warehouse / "events",
            date,
            run_dir / "events",
            {
                "dataset": spec.name,
                "source": report.source,
                "counts": asdict(counts),
                "features": spec.event_features(),
                "run": run_summary,
            },
        )
