"""``deepclick demo`` / ``make demo``: run every stage that exists on freshly generated data.

It generates a few days of marketplace logs, ingests each day, builds the features for the last day
(training on the days before it, evaluating on it) and prints what each stage produced. One Spark
session serves all stages, so the demo pays Spark's start-up once.
"""

from __future__ import annotations

import datetime as dt
import json
import time

from rich.console import Console
from rich.table import Table

from deepclick.settings import Settings
from pipelines.features.runner import run_features
from pipelines.ingest.runner import run_ingest
from pipelines.simulate import run_simulate
from pipelines.spark import get_spark
from pipelines.specs import load_spec


def run_demo(
    settings: Settings, *, days: int, impressions_per_day: int, console: Console
) -> dict[str, float]:
    """Run the pipeline end to end; return the seconds each stage took."""
    timings: dict[str, float] = {}
    sim = settings.simulate.model_copy(
        update={"days": days, "impressions_per_day": impressions_per_day}
    )
    raw = settings.raw_dir / "marketplace"
    console.rule(f"simulate {days} days × {impressions_per_day:,} impressions → {raw}")
    start = time.perf_counter()
    summary = run_simulate(sim, raw)
    timings["simulate"] = time.perf_counter() - start
    _table(console, "simulated days", [d.__dict__ for d in summary.days],
           ["date", "impressions", "clicks", "ctr", "oracle_auc", "new_ads", "new_placements"])

    spark = get_spark(settings.spark)
    spec = load_spec("marketplace")
    console.rule("ingest (Spark)")
    start = time.perf_counter()
    reports = [
        run_ingest(settings, spec, raw / day.date, dt.date.fromisoformat(day.date), spark=spark)
        for day in summary.days
    ]
    timings["ingest"] = time.perf_counter() - start
    _table(console, "ingested partitions", [
        {"date": r.start, "rows_in": r.rows_in, "written": r.rows_written,
         "quarantined": r.rows_quarantined, "duplicates": r.duplicates_dropped}
        for r in reports
    ], ["date", "rows_in", "written", "quarantined", "duplicates"])

    target = summary.days[-1].date
    console.rule(f"features for {target} (trained on the days before)")
    start = time.perf_counter()
    folder = run_features(settings, dt.date.fromisoformat(target), spark=spark)
    timings["features"] = time.perf_counter() - start
    counts = json.loads((folder / "manifest.json").read_text()).get("counts", {})
    _table(console, f"feature tables in {folder}", [counts], list(counts))

    _table(console, "seconds per stage", [{k: round(v, 1) for k, v in timings.items()}],
           list(timings))
    return timings


def _table(console: Console, title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
