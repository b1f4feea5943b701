"""Choose ``features.history_days`` by measurement: the ranker on D with each history look-back.

For each look-back N (0 = cumulative counts over every earlier day, today's definition) the
features stage is re-run on an existing state folder's warehouse with ``features.history_days``
N (into ``<root>/bench-history/h<N>/``, the state's own features are left alone), then the real
ranker (``models.ranker.train.train_ranker``, the daily run's split: two-tower scores from the
state's embeddings, which the history features do not feed) is trained once per seed and
scored on D's ``eval`` rows. Per variant and seed: AUC on D with its bootstrap 95% interval and
the paired difference to the first variant of the same seed (same rows), calibration on D with
its interval, predicted over true expected clicks (generated data), the one-hot LR peer's AUC on
the same rows, and the ranker's calibration on every training day (predicted over actual
clicks: the early days are where cumulative counts mislead a model). Usage::

    python -m bench.history_window --root var/hw-demo --date 2024-01-04 \\
        --history-days 0 --history-days 3 --history-days 7 --seed 7 --seed 8

The state folder needs D's ingested events and embeddings (a daily run of D up to ``embed``, e.g.
the state of ``python -m bench.quality``); ``--scale demo|medium`` builds it first (the world of
``bench.quality``'s scale: simulate, ingest every day up to D, D's ``features``, ``towers`` and
``embed``; skipped where already done).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import similarity_providers
from bench.ranker_split import one_hot_lr, true_clicks
from deepclick import layout
from deepclick.layout import version_for
from deepclick.settings import Settings
from models.evaluation.ranking import (
    auc,
    auc_difference_interval,
    auc_interval,
    calibration_interval,
    calibration_ratio,
)
from models.feature_spec import load_feature_spec
from models.ranker.train import on_served_scores, train_ranker
from pipelines.features.runner import find_inputs, run_features
from pipelines.training_days import split_training_days


def build_variant(settings: Settings, date: dt.date, history_days: int, spark) -> Path:
    """The features folder of D with ``history_days`` (built once, reused when present)."""
    out = settings.root / "bench-history" / f"h{history_days}" / version_for(date)
    if (out / "feature_spec.json").is_file():
        return out
    cfg = settings.features.model_copy(update={"history_days": history_days})
    variant = settings.model_copy(update={"features": cfg})
    inputs = find_inputs(layout.warehouse(settings.root), date, cfg)
    return run_features(variant, inputs, out, spark)


def build_state(settings: Settings, scale: str, date: dt.date, spark) -> None:
    """Simulate ``scale``'s world and run the daily stages up to ``embed`` for D (resumable)."""
    from rich.console import Console

    from bench.quality import scales
    from lifecycle.daily import run_daily
    from pipelines.simulate import run_simulate

    sim = scales()[scale].simulate
    raw = layout.raw_dir(settings.root) / "marketplace"
    if not (raw / date.isoformat()).is_dir():
        run_simulate(sim, raw)
    first, console = dt.date.fromisoformat(sim.start_date), Console()
    for offset in range((date - first).days):
        day = first + dt.timedelta(days=offset)
        run_daily(settings, day, source=raw, spark=spark, console=console, stages=["ingest"])
    stages = ["ingest", "features", "towers", "embed"]
    run_daily(settings, date, source=raw, spark=spark, console=console, stages=stages)


def per_day_calibration(trained, rows: pd.DataFrame) -> dict[str, float]:
    """Predicted over actual clicks on each training day's rows."""
    p = trained.predict(rows)
    frame = pd.DataFrame({"date": rows["date"].astype(str), "p": p, "y": rows["label"]})
    sums = frame.groupby("date")[["p", "y"]].sum()
    return {day: round(float(r.p / r.y), 3) for day, r in sums.iterrows() if r.y}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--history-days", type=int, action="append", default=[])
    parser.add_argument("--seed", type=int, action="append", default=[])
    parser.add_argument("--skip-lr", action="store_true")
    parser.add_argument("--scale", choices=["demo", "medium"], help="build the state first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from pipelines.spark import get_spark

    settings = Settings(root=args.root)
    date = dt.date.fromisoformat(args.date)
    spark = get_spark(settings.spark)
    if args.scale:
        from bench.quality import scales

        settings = settings.model_copy(update={"simulate": scales()[args.scale].simulate})
        build_state(settings, args.scale, date, spark)
    fit_similarity, similarity = similarity_providers(settings.root, version_for(date))
    seeds = args.seed or [settings.ranker.seed]
    results: dict[str, dict] = {}
    first: dict[int, np.ndarray] = {}
    for n in args.history_days or [0]:
        tick = time.perf_counter()
        folder = build_variant(settings, date, n, spark)
        built = round(time.perf_counter() - tick, 1)
        spec = load_feature_spec(folder)
        eval_rows = pd.read_parquet(folder / "eval")
        train_rows = pd.read_parquet(folder / "training" / "ranking")
        y = eval_rows[spec.label].to_numpy()
        truth = true_clicks(settings, args.date, eval_rows)
        days = split_training_days(spec.train_dates, True, settings.lifecycle.ranker_days)
        lr = None
        if not args.skip_lr:
            fit = train_rows[train_rows["date"].astype(str).isin(days.ranker)]
            lr = round(auc(y, one_hot_lr(spec, fit, eval_rows)), 4)
        for seed in seeds:
            tick = time.perf_counter()
            cfg = settings.ranker.model_copy(update={"seed": seed})
            trained = train_ranker(
                spec,
                cfg,
                similarity=fit_similarity if days.similarity else None,
                progress=False,
                dates=days.ranker,
            )
            p = on_served_scores(trained, similarity).predict(eval_rows)
            base = first.setdefault(seed, p)
            name = f"h{n}@seed{seed}"
            results[name] = {
                "history_days": n,
                "seed": seed,
                "auc": round(auc(y, p), 4),
                "auc_ci": [round(v, 4) for v in auc_interval(y, p)],
                "auc_minus_first": [round(v, 4) for v in auc_difference_interval(y, p, base)],
                "calibration": round(float(calibration_ratio(y, p)), 3),
                "calibration_ci": [round(float(v), 3) for v in calibration_interval(y, p)],
                "predicted_over_true_clicks": (
                    None if truth is None else round(float(p.sum()) / truth, 3)
                ),
                "calibration_by_training_day": per_day_calibration(trained, train_rows),
                "lr_same_rows_auc": lr,
                "ranker_days": list(days.ranker),
                "features_seconds": built,
                "seconds": round(time.perf_counter() - tick, 1),
            }
            print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
