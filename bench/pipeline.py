"""Benchmark the batch pipeline: simulate → ingest → features at several sizes, and the whole
daily run (``--daily``).

    python -m bench.pipeline --impressions 1000000 10000000
    python -m bench.pipeline --daily --impressions 10000000

For each size it generates ``--days`` days of marketplace logs (entity counts scale with the size),
ingests every day with Spark, builds the features of the last day, and reports wall time and rows/s
per stage. The baseline, measured in the same run, is a plain Spark scan of the same CSV files
(read + count): ``ingest / scan`` says what validation, canonicalisation and publishing cost on top
of reading the bytes. Results: a table on the console and ``bench/results/pipeline.json``.

``--daily`` measures the end-to-end daily run of the last day instead (DESIGN.md target: at most
30 minutes on this machine for 10M impressions). The earlier days are ingested first (set-up,
timed but not part of the run); then every stage of the last day runs as the Airflow DAG runs it
(``lifecycle.daily.run_stage`` with one run key: one MLflow parent run, one ledger), each with its
wall time and the peak resident memory of the Python driver and of its children (Spark's JVM).
The training window then holds every earlier day, (days - 1) / days of the impressions. Results go
to ``bench/results/pipeline_daily.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import PeakMemory, print_table, write_json
from deepclick import layout
from deepclick.layout import DayLayout
from deepclick.settings import RankerSettings, Settings, SimulateSettings, SparkSettings
from lifecycle.daily import run_daily, run_stage
from lifecycle.stages import STAGE_NAMES
from pipelines.features.runner import find_inputs, run_features
from pipelines.ingest.runner import run_ingest
from pipelines.simulate import run_simulate
from pipelines.spark import get_spark
from pipelines.specs import load_spec


def simulate_settings(impressions: int, days: int, seed: int) -> SimulateSettings:
    """A marketplace whose entity counts grow with the log (10 impressions per user, 100 per ad)."""
    return SimulateSettings(
        seed=seed,
        days=days,
        impressions_per_day=impressions // days,
        num_users=max(1_000, impressions // 10),
        num_ads=max(500, impressions // 100),
        num_placements=max(50, impressions // 10_000),
        num_advertisers=max(20, impressions // 5_000),
    )


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def scan_days(spark: Any, day_dirs: list[Path]) -> int:
    """The baseline: a plain Spark read + count of the days' raw CSV files."""
    return spark.read.csv([str(d / "raw_sample.csv") for d in day_dirs], header=True).count()


def run_size(impressions: int, days: int, root: Path, spark_settings: SparkSettings) -> list[dict]:
    settings = Settings(root=root, spark=spark_settings)
    raw = layout.raw_dir(settings.root) / "marketplace"
    spark = get_spark(settings.spark)
    summary, t_sim = _timed(lambda: run_simulate(simulate_settings(impressions, days, 7), raw))
    day_dirs = [raw / d.date for d in summary.days]

    scanned, t_scan = _timed(lambda: scan_days(spark, day_dirs))
    spec = load_spec("marketplace")
    reports, t_ingest = _timed(
        lambda: [
            run_ingest(settings, spec, d, dt.date.fromisoformat(d.name), spark=spark)
            for d in day_dirs
        ]
    )
    target = dt.date.fromisoformat(summary.days[-1].date)
    inputs = find_inputs(layout.warehouse(settings.root), target, settings.features)
    out = DayLayout(settings.root, target).features
    folder, t_features = _timed(lambda: run_features(settings, inputs, out, spark=spark))
    counts = json.loads((folder / "manifest.json").read_text()).get("counts", {})
    written = sum(r.rows_written for r in reports)
    rows = [
        {
            "impressions": impressions,
            "stage": "simulate",
            "seconds": t_sim,
            "rows_per_s": impressions / t_sim,
            "vs_scan": t_sim / t_scan,
        },
        {
            "impressions": impressions,
            "stage": "scan (baseline)",
            "seconds": t_scan,
            "rows_per_s": scanned / t_scan,
            "vs_scan": 1.0,
        },
        {
            "impressions": impressions,
            "stage": "ingest",
            "seconds": t_ingest,
            "rows_per_s": written / t_ingest,
            "vs_scan": t_ingest / t_scan,
        },
        {
            "impressions": impressions,
            "stage": "features",
            "seconds": t_features,
            "rows_per_s": impressions / t_features,
            "vs_scan": t_features / t_scan,
            "ranking_rows": counts.get("training/ranking"),
        },
    ]
    return rows


def run_daily_size(
    impressions: int,
    days: int,
    root: Path,
    spark_settings: SparkSettings,
    negative_sampling_rate: float,
) -> tuple[list[dict], dict[str, Any]]:
    """Generate ``days`` days, ingest all but the last, then time the last day's daily run."""
    settings = Settings(
        root=root,
        spark=spark_settings,
        ranker=RankerSettings(negative_sampling_rate=negative_sampling_rate),
    )
    spark = get_spark(settings.spark)
    raw = layout.raw_dir(settings.root) / "marketplace"
    rows: list[dict] = []
    with PeakMemory() as peak:
        with peak.phase("simulate (set-up)"):
            summary, t_sim = _timed(
                lambda: run_simulate(simulate_settings(impressions, days, 7), raw)
            )
        dates = [dt.date.fromisoformat(d.date) for d in summary.days]
        rows.append({"stage": "simulate (set-up)", "seconds": t_sim})

        with peak.phase("scan (baseline)"):
            scanned, t_scan = _timed(lambda: scan_days(spark, [raw / d.isoformat() for d in dates]))
        rows.append({"stage": "scan (baseline)", "seconds": t_scan, "rows": scanned})
        quiet = Console(file=io.StringIO())
        with peak.phase("ingest earlier days (set-up)"):
            _, t_history = _timed(
                lambda: [
                    run_daily(settings, d, stages=["ingest"], spark=spark, console=quiet)
                    for d in dates[:-1]
                ]
            )
        rows.append({"stage": "ingest earlier days (set-up)", "seconds": t_history})
        target = dates[-1]
        run_key = f"bench-{target.isoformat()}"
        results = []
        started = time.perf_counter()
        for name in STAGE_NAMES:
            with peak.phase(name):
                result = run_stage(settings, target, name, run_key=run_key, spark=spark)
            results.append(result)
            rows.append({"stage": name, "seconds": result.seconds, "status": result.status})
            print(f"  {name}: {result.status} in {result.seconds:,.1f} s — {result.note}")
        total = time.perf_counter() - started
    rows.append({"stage": "daily run (total)", "seconds": total, "status": "ran"})
    overall = {"python_mb": 0.0, "children_mb": 0.0, "total_mb": 0.0}
    for row in rows:
        row["impressions"] = impressions
        row["vs_scan"] = row["seconds"] / t_scan
        row.update(peak.phases.get(row["stage"], {}))
        if row["stage"] in STAGE_NAMES:
            overall = {k: max(v, row[k]) for k, v in overall.items()}
    rows[-1].update(overall)
    metrics = {r.name: r.metrics for r in results}
    return rows, {"target_date": target.isoformat(), "stage_metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("var/bench/pipeline"))
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--daily", action="store_true", help="time the whole daily run instead")
    parser.add_argument(
        "--negative-sampling-rate",
        type=float,
        default=0.1,
        help="ranker: share of non-clicks kept (--daily; corrected after training)",
    )
    args = parser.parse_args(argv)
    spark_settings = SparkSettings(master="local[*]", driver_memory="8g", log_level="ERROR")
    if args.daily:
        daily(args, spark_settings)
        return
    rows: list[dict] = []
    for n in args.impressions:
        root = args.root / str(n)
        shutil.rmtree(root, ignore_errors=True)
        rows += run_size(n, args.days, root, spark_settings)
        print_table("pipeline benchmark", rows)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = write_json("pipeline", {"rows": rows, "driver_peak_rss_mb": peak_mb, "days": args.days})
    print(f"driver peak RSS {peak_mb:,.0f} MB (Spark's JVM not included); wrote {path}")


def daily(args: argparse.Namespace, spark_settings: SparkSettings) -> None:
    rows: list[dict] = []
    details: dict[str, Any] = {}
    for n in args.impressions:
        root = args.root / f"daily-{n}"
        shutil.rmtree(root, ignore_errors=True)
        size_rows, details[str(n)] = run_daily_size(
            n, args.days, root, spark_settings, args.negative_sampling_rate
        )
        rows += size_rows
        print_table("daily run benchmark (peak memory in MB)", rows)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    path = write_json(
        "pipeline_daily",
        {
            "rows": rows,
            "days": args.days,
            "negative_sampling_rate": args.negative_sampling_rate,
            "sizes": details,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
