"""The daily pipeline on a real public click log through its built-in dataset spec — no
conversion script: the raw file is read where it lies.

    python -m bench.real_logs --talkingdata PATH/TO/talkingdata_sample

TalkingData AdTracking (``train_sample.csv``: 100,000 clicks over 2017-11-06..09, 227 installs)
is read by ``pipelines/specs/talkingdata.yaml``. Every day before the evaluation day is ingested
(the ``ingest`` stage of its daily run), then the whole daily run of the evaluation day runs —
ingest, features, towers, embed, index, ranker, evaluate, gate, publish — and the stage table and
the metrics each stage recorded are printed. Library output goes to a log file under the state
root (``--verbose`` keeps it on the console). Results: ``bench/results/real_logs.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import print_table, write_json
from deepclick.settings import LifecycleSettings, Settings

REPO = Path(__file__).resolve().parents[1]
SHOWN_METRICS = {
    "ingest": ("rows_in", "rows_written", "rows_quarantined", "duplicates_dropped"),
    "features": ("train_impressions", "train_clicks", "eval_impressions", "eval_clicks"),
    "towers": ("examples",),
    "index": ("ads", "ann_recall_at_k"),
    "ranker": ("holdout_auc", "baseline_holdout_auc", "holdout_logloss"),
    "evaluate": (
        "auc",
        "logloss",
        "normalized_entropy",
        "calibration_ratio",
        "recall_at_100",
        "retrieval.popularity_overall.100",
    ),
    "gate": ("promote",),
}


def pick(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """The headline metrics of a stage, plus any confidence interval it recorded."""
    names = SHOWN_METRICS.get(stage, ())
    return {k: v for k, v in metrics.items() if k in names or "_ci" in k or k.startswith("ci_")}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from lifecycle.daily import run_daily

    root = args.root.resolve()
    settings = Settings(
        root=root,
        lifecycle=LifecycleSettings(dataset=args.dataset, source=args.source.resolve()),
        mlflow={"enabled": args.mlflow},
    )
    first = dt.date.fromisoformat(args.first)
    day = dt.date.fromisoformat(args.date)
    started = time.perf_counter()
    for offset in range((day - first).days):
        before = first + dt.timedelta(days=offset)
        run_daily(settings, before, stages=["ingest"], console=console)
    report = run_daily(settings, day, console=console)
    seconds = time.perf_counter() - started
    rows = [
        {"name": stage.name, "metric": metric, "value": value}
        for stage in report.stages
        for metric, value in pick(stage.name, stage.metrics).items()
    ]
    print_table(f"{args.dataset} {day}: metrics (built-in spec, no conversion)", rows)
    decision = report.decision or {}
    console.print(
        f"decision: {decision.get('action', 'none')} — {decision.get('reason', '')}\n"
        f"serving release: {report.release or 'none'}; total {seconds:,.1f} s"
    )
    return {
        "dataset": args.dataset,
        "source": str(args.source),
        "date": day.isoformat(),
        "seconds": round(seconds, 1),
        "stages": [
            {"name": s.name, "status": s.status, "seconds": s.seconds, "metrics": s.metrics}
            for s in report.stages
        ],
        "decision": decision,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--talkingdata",
        dest="source",
        type=Path,
        required=True,
        help="folder (or file) of the TalkingData AdTracking log (train_sample.csv)",
    )
    parser.add_argument("--dataset", default="talkingdata", help="built-in spec or spec path")
    parser.add_argument("--first", default="2017-11-06", help="first day to ingest")
    parser.add_argument("--date", default="2017-11-09", help="the day of the full daily run")
    parser.add_argument("--root", type=Path, default=REPO / "var" / "bench" / "real_logs")
    parser.add_argument("--fresh", action="store_true", help="start from an empty state root")
    parser.add_argument("--mlflow", action="store_true", help="track the run in MLflow")
    parser.add_argument("--verbose", action="store_true", help="library output on the console")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"--talkingdata {args.source} does not exist")
    console = Console()
    if args.fresh and args.root.exists():
        shutil.rmtree(args.root)
    routed = None
    if not args.verbose:
        from deepclick.library_logs import route_library_output

        routed = route_library_output(args.root.resolve())
        console.print(
            f"[dim]library output (TensorFlow, Spark): {routed.path}[/dim]", soft_wrap=True
        )
    try:
        record = run(args, console)
    finally:
        if routed is not None:
            routed.restore()
    console.print(f"wrote {write_json('real_logs', record)}")


if __name__ == "__main__":
    main()
