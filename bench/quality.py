"""Model quality, the whole matrix in one command (issue 10, item 6).

For each dataset, the daily run of its last day D (training on the days before, as a user would
run it), then the numbers the issue's targets are stated in, read from D's published evaluation:

- ranker / one-hot LR / GBDT / ad CTR prior AUC on D with 95% CIs (same rows), oracle AUC on
  generated data, the ranker's calibration with its interval from D's click count;
- funnel recall@100/500 of D's clicks: what serving retrieves (two-tower + popular quota) against
  plain popularity;
- on generated data, the replay of D's requests against the truth: the served top-10 slate as a
  share of the oracle and as a multiple of the most-clicked ads.

Usage::

    python -m bench.quality                              # demo scale: 4 days x 20k
    python -m bench.quality --scale medium               # 8 days x 150k, 100k users, 20k ads
    python -m bench.quality --scale large                # 10M impressions (8 days), ~1 h
    python -m bench.quality --scale none \\
        --spec pipelines/specs/talkingdata.yaml \\
        --source PATH/TO/talkingdata_sample/train_sample.csv --date 2017-11-09

``--talkingdata PATH`` is short for the built-in ``talkingdata`` spec over that folder's sample
(D = 2017-11-09). State goes under ``--root`` (default ``var/bench-quality``), one folder per
dataset; the table is printed and written to ``bench/results/quality-<datasets>.json``.
Re-running resumes: unchanged stages are skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import print_table, write_json
from deepclick import layout
from deepclick.settings import Settings, SimulateSettings

ROOT = Path("var/bench-quality")


@dataclass(frozen=True)
class Scale:
    """A generated marketplace: its size and the command that documents it."""

    name: str
    simulate: SimulateSettings


def scales() -> dict[str, Scale]:
    from bench.pipeline import simulate_settings

    return {
        "demo": Scale("demo", SimulateSettings(days=4, impressions_per_day=20_000)),
        "medium": Scale(
            "medium",
            SimulateSettings(
                days=8, impressions_per_day=150_000, num_users=100_000, num_ads=20_000, seed=11
            ),
        ),
        "large": Scale("large", simulate_settings(10_000_000, 8, 7)),
    }


def _settings(root: Path, simulate: SimulateSettings | None = None, **lifecycle: Any) -> Settings:
    base = Settings(root=root)  # the environment (DEEPCLICK_*) still applies
    updates: dict[str, Any] = {"lifecycle": base.lifecycle.model_copy(update=lifecycle)}
    if simulate is not None:
        updates["simulate"] = simulate
    return base.model_copy(update=updates)


def run_generated(scale: Scale, root: Path, console: Console) -> dict[str, Any]:
    """Simulate, ingest the training days, run D (the last day); return its numbers."""
    from lifecycle.daily import run_daily
    from pipelines.simulate import run_simulate
    from pipelines.spark import get_spark

    settings = _settings(root / scale.name, scale.simulate)
    raw = layout.raw_dir(settings.root) / "marketplace"
    sim = scale.simulate
    started = time.perf_counter()
    days = [dt.date.fromisoformat(sim.start_date) + dt.timedelta(days=d) for d in range(sim.days)]
    if not (raw / days[-1].isoformat()).is_dir():
        run_simulate(sim, raw)
    spark = get_spark(settings.spark)
    for day in days[:-1]:
        run_daily(settings, day, source=raw, spark=spark, console=console, stages=["ingest"])
    report = run_daily(settings, days[-1], source=raw, spark=spark, console=console)
    row = collect(settings, days[-1])
    row.update(
        {
            "dataset": f"generated {scale.name}",
            "impressions": sim.days * sim.impressions_per_day,
            "decision": (report.decision or {}).get("action"),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return row


def run_real(
    spec: str, source: Path, date: dt.date, root: Path, first: dt.date, console: Console
) -> dict[str, Any]:
    """A real log through a dataset spec: ingest the days from ``first``, run D."""
    from lifecycle.daily import run_daily
    from pipelines.spark import get_spark
    from pipelines.specs import load_spec

    name = load_spec(spec).name
    settings = _settings(root / name, dataset=spec)
    spark = get_spark(settings.spark)
    started = time.perf_counter()
    day = first
    while day < date:
        run_daily(settings, day, source=source, spark=spark, console=console, stages=["ingest"])
        day += dt.timedelta(days=1)
    report = run_daily(settings, date, source=source, spark=spark, console=console)
    row = collect(settings, date)
    row.update(
        {
            "dataset": name,
            "decision": (report.decision or {}).get("action"),
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return row


def _ci(summary: dict[str, Any], key: str, low: str, high: str) -> str | None:
    if key not in summary:
        return None
    value = summary[key]
    if low in summary and high in summary:
        return f"{value:.3f} [{summary[low]:.3f}, {summary[high]:.3f}]"
    return f"{value:.3f}"


def collect(settings: Settings, date: dt.date) -> dict[str, Any]:
    """D's numbers from its published evaluation folder (summary, ranking, retrieval, replay)."""
    from deepclick.layout import version_for
    from deepclick.publish import read_manifest

    folder = settings.root / "evaluations" / version_for(date)
    summary = read_manifest(folder).get("metrics", {})
    ranking = json.loads((folder / "ranking" / "metrics.json").read_text())
    models = ranking["models"]
    row: dict[str, Any] = {
        "D": date.isoformat(),
        "clicks_on_D": int(summary.get("eval_clicks", 0)),
        "ranker_auc": _ci(summary, "auc", "auc_ci_low", "auc_ci_high"),
    }
    for name, label in (
        ("logistic_regression", "lr_auc"),
        ("gbdt", "gbdt_auc"),
        ("ad_ctr_prior", "prior_auc"),
    ):
        if name in models:
            ci = models[name].get("auc_ci95")
            row[label] = f"{models[name]['auc']:.3f}" + (
                f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            )
    if "oracle_auc" in summary:
        row["oracle_auc"] = round(summary["oracle_auc"], 3)
    row["calibration"] = _ci(
        summary, "calibration_ratio", "calibration_ci_low", "calibration_ci_high"
    )
    retrieval_file = folder / "retrieval" / "retrieval.json"
    if retrieval_file.is_file():
        retrieval = json.loads(retrieval_file.read_text())
        curves = retrieval.get("recall_at_k", {})
        served = curves.get("two_tower_popular", {})
        popular = curves.get("popularity_overall", {})
        for k in ("100", "500"):
            if k in served and k in popular and popular[k]:
                row[f"funnel_recall@{k}"] = round(served[k], 3)
                row[f"x_popularity@{k}"] = round(served[k] / popular[k], 2)
        cold = retrieval.get("cold_start") or {}
        if cold.get("clicks_on_new_ads"):
            # D's clicks on ads without training rows that the served candidates (K = 500) hold:
            # the fresh slots' way in (candidates/funnel.py), which popularity never has.
            n = int(cold["clicks_on_new_ads"])
            share = cold.get("recall_at_k", {}).get("two_tower_popular", {}).get("500")
            if share is not None:
                row["new_ad_clicks@500"] = f"{round(share * n)}/{n}"
    replay_file = folder / "replay" / "replay.json"
    if replay_file.is_file():
        replay = json.loads(replay_file.read_text())
        served = replay.get("systems", {}).get("deepclick", {}).get("top_10", {})
        if "share_of_oracle" in served:
            ci = served.get("share_of_oracle_ci95") or [None, None]
            row["replay_of_oracle"] = f"{served['share_of_oracle']:.3f}" + (
                f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
            )
        if "x_popularity" in served:
            ci = served.get("x_popularity_ci95") or [None, None]
            row["replay_x_popularity"] = f"{served['x_popularity']:.3f}" + (
                f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
            )
        row["replay"] = {name: entry["top_10"] for name, entry in replay.get("systems", {}).items()}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        choices=["demo", "medium", "large", "none"],
        nargs="+",
        default=["demo"],
        help="generated scales to run ('none': only real logs)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="state folder")
    parser.add_argument("--talkingdata", type=Path, help="folder of the TalkingData sample")
    parser.add_argument("--spec", help="dataset spec (name or YAML path) of a real log")
    parser.add_argument("--source", type=Path, help="the real log (file or folder)")
    parser.add_argument("--date", help="D of the real log, YYYY-MM-DD")
    parser.add_argument("--first-date", help="first day to ingest (default: D - 3)")
    args = parser.parse_args(argv)
    console = Console(width=200)
    rows: list[dict[str, Any]] = []
    table = scales()
    for name in args.scale:
        if name != "none":
            rows.append(run_generated(table[name], args.root, console))
    real: list[tuple[str, Path, dt.date]] = []
    if args.talkingdata is not None:
        real.append(("talkingdata", args.talkingdata, dt.date(2017, 11, 9)))
    if args.spec:
        if args.source is None or args.date is None:
            parser.error("--spec needs --source and --date")
        real.append((args.spec, args.source, dt.date.fromisoformat(args.date)))
    for spec, source, date in real:
        first = (
            dt.date.fromisoformat(args.first_date)
            if args.first_date
            else date - dt.timedelta(days=3)
        )
        rows.append(run_real(spec, source, date, args.root, first, console))
    shown = [{k: v for k, v in r.items() if k != "replay"} for r in rows]
    print_table("model quality on D (bench/quality)", shown, console)
    for row in rows:
        if row.get("replay"):
            replay_rows = [
                {
                    "system": name,
                    "top10_ctr": round(e["expected_ctr"], 4),
                    "of_oracle": round(e.get("share_of_oracle", float("nan")), 3),
                    "x_popularity": round(e.get("x_popularity", float("nan")), 3),
                }
                for name, e in row["replay"].items()
            ]
            print_table(f"replay of {row['dataset']} (top-10 slates)", replay_rows, console)
    generated = [n for n in args.scale if n != "none"]
    names = generated + [str(r["dataset"]) for r in rows[len(generated) :]]
    path = write_json("quality-" + "-".join(n.replace(" ", "_") for n in names), {"rows": rows})
    console.print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
