"""Measure ranker choices on day D's rows: which training days, epochs / early stopping, embedding
regularisation, against a one-hot logistic regression (scikit-learn, C=0.1) on the same rows.

Trains the real ranker (``models.ranker.train.train_ranker``) once per variant on a published
features folder and scores D's ``eval`` table. Usage::

    python -m bench.ranker_split --root var/demo --date 2024-01-04 \
        --variant base --variant 'all_days:similarity=0' --variant 'es:epochs=8'

A variant is ``name[:key=value,...]``; keys are RankerSettings fields plus ``similarity`` (0/1:
the ranker takes the two-tower scores, trained on the last ``ranker_days`` days), ``ranker_days``
(without the scores, given explicitly: the ranker learns from the window's last ``ranker_days``
days only) and ``clip`` (the shared preprocessing's clip of standardised numbers,
``models.preprocessing``; ``inf``: none). Each variant's AUC on D comes with its bootstrap 95%
interval and the paired difference to the first variant (same rows, ``auc_difference_interval``);
each variant's line goes to the console, all of them to ``bench/results/<--out>.json``.
``--seed`` (repeatable) trains every variant once per ranker seed and pairs each with the first
variant of the same seed, so a choice is kept only when it wins on more than one seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

import models.preprocessing
from bench.common import evaluated_predictions, similarity_providers, write_json
from bench.ranker_variants import parse_variant, ranker_settings
from deepclick import layout
from deepclick.layout import version_for
from deepclick.publish import resolve
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
from pipelines.training_days import split_training_days


def served_scores(root: Path, version: str, labels: np.ndarray) -> np.ndarray:
    """The served ranker's scores of D's evaluation rows, as D's evaluation stored them; refused
    unless they are those very rows in that order."""
    return evaluated_predictions(root, version, labels)["ranker"].to_numpy()


def one_hot_lr(spec, fit: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    cats = [f.name for f in spec.categorical]
    nums = [f.name for f in spec.numeric]
    enc = OneHotEncoder(handle_unknown="ignore", min_frequency=1)
    x_fit = enc.fit_transform(fit[cats].astype(str))
    x_test = enc.transform(test[cats].astype(str))
    if nums:
        mu = fit[nums].astype(float).mean()
        sd = fit[nums].astype(float).std().replace(0, 1)
        x_fit = sp.hstack([x_fit, ((fit[nums].astype(float) - mu) / sd).fillna(0).values]).tocsr()
        x_test = sp.hstack(
            [x_test, ((test[nums].astype(float) - mu) / sd).fillna(0).values]
        ).tocsr()
    model = LogisticRegression(C=0.1, max_iter=2000)
    model.fit(x_fit, fit[spec.label].to_numpy())
    return model.predict_proba(x_test)[:, 1]


def true_clicks(settings: Settings, date: str, eval_rows: pd.DataFrame) -> float | None:
    """D's expected clicks under the simulator's truth (generated data), else None: a ratio of
    predicted to true expected clicks leaves out the Poisson noise of D's realised clicks."""
    path = layout.truth_dir(settings.root, settings.lifecycle.dataset) / f"{date}.parquet"
    if not path.is_file():
        return None
    truth = pd.read_parquet(path)
    lookup = truth.set_index(truth["impression_id"].astype(str))["p_click"]
    return float(eval_rows["event_id"].astype(str).map(lookup).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument(
        "--seed", type=int, action="append", default=[], help="ranker seed(s) (default: settings)"
    )
    parser.add_argument(
        "--skip-lr", action="store_true", help="no one-hot LR fits (the evaluation has the peers)"
    )
    parser.add_argument(
        "--against-served",
        action="store_true",
        help="also pair each variant with the served ranker's scores of D (the evaluation's "
        "predictions.parquet): what the variant would change, without training the base again",
    )
    parser.add_argument(
        "--out",
        help="bench/results/<out>.json, as every bench names it (default "
        "ranker_split-<root folder>-<version>)",
    )
    args = parser.parse_args(argv)
    settings = Settings(root=args.root)
    version = version_for(dt.date.fromisoformat(args.date))
    features = resolve(layout.warehouse(settings.root) / "features", version, what="features")
    spec = load_feature_spec(features)
    eval_rows = pd.read_parquet(features / "eval")
    y = eval_rows[spec.label].to_numpy()
    truth = true_clicks(settings, args.date, eval_rows)
    fit_similarity, similarity = similarity_providers(settings.root, version)
    results = {}
    # every training row in pandas: only for the LR fits (at 10M scale that is 9M rows)
    train_all = None if args.skip_lr else pd.read_parquet(features / "training" / "ranking")
    default_clip = models.preprocessing.CLIP_STD
    seeds = args.seed or [settings.ranker.seed]
    variants = args.variant or ["base"]
    first: np.ndarray | None = None
    served = served_scores(settings.root, version, y) if args.against_served else None
    for seed, variant in ((s, v) for s in seeds for v in variants):
        name, pairs = parse_variant(variant)
        if len(seeds) > 1:
            name = f"{name}@seed{seed}"
        if variant == variants[0]:
            first = None  # each seed's variants are paired with its own first variant
        pairs.setdefault("seed", str(seed))
        use_sim = pairs.pop("similarity", "1") == "1"
        recent = "ranker_days" in pairs and not use_sim
        ranker_days = int(pairs.pop("ranker_days", settings.lifecycle.ranker_days))
        models.preprocessing.CLIP_STD = float(pairs.pop("clip", default_clip))
        cfg = ranker_settings(settings.ranker, pairs)
        days = split_training_days(spec.train_dates, use_sim, ranker_days)
        if recent:  # without the scores: the ranker on the window's last ranker_days days only
            days = replace(days, ranker=days.ranker[-ranker_days:])
        tick = time.perf_counter()
        trained = train_ranker(
            spec,
            cfg,
            similarity=fit_similarity if days.similarity else None,
            progress=False,
            dates=days.ranker,
        )
        scoring = on_served_scores(trained, similarity)
        p = scoring.predict(eval_rows)
        before_head = 1.0 / (1.0 + np.exp(-scoring.predict_logits(eval_rows)))
        lr_same = None
        if train_all is not None:
            fit = train_all[train_all["date"].astype(str).isin(days.ranker)]
            lr_same = one_hot_lr(spec, fit, eval_rows)
        first = p if first is None else first
        low, high = auc_interval(y, p)
        diff = auc_difference_interval(y, p, first)
        results[name] = {
            "auc": round(auc(y, p), 4),
            "auc_ci": [round(low, 4), round(high, 4)],
            "auc_minus_first": [round(v, 4) for v in diff],
            "auc_minus_served": None
            if served is None
            else [round(v, 4) for v in auc_difference_interval(y, p, served)],
            "clip": models.preprocessing.CLIP_STD,
            "calibration": round(float(calibration_ratio(y, p)), 3),
            "calibration_ci": [round(float(v), 3) for v in calibration_interval(y, p)],
            "calibration_before_head": round(float(calibration_ratio(y, before_head)), 3),
            "predicted_over_true_clicks": (
                None if truth is None else round(float(p.sum()) / truth, 3)
            ),
            "holdout_clicks": int(trained.metrics["holdout_clicks"]),
            "holdout_calibration": round(float(trained.metrics["holdout_calibration_ratio"]), 3),
            "head": {
                k: round(float(trained.calibration[k]), 4)
                for k in ("slope", "intercept")
                if trained.calibration.get(k) is not None
            },
            "epochs_run": len(trained.history.get("loss", [])),
            "val_auc": [round(v, 4) for v in trained.history.get("val_auc", [])],
            "lr_same_rows_auc": None if lr_same is None else round(auc(y, lr_same), 4),
            "ranker_days": list(days.ranker),
            "fit_rows": int(trained.metrics["fit_rows"]),
            "fits": {k: v for k, v in trained.metrics.items() if k.startswith(("wide_", "fm_"))},
            "seconds": round(time.perf_counter() - tick, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
    if train_all is not None:
        lr_all = one_hot_lr(spec, train_all, eval_rows)
        results["lr_all_days"] = {"auc": round(auc(y, lr_all), 4)}
        print("lr_all_days", results["lr_all_days"], flush=True)
    print(f"written to {write_results(args.out, args.root, args.date, version, results)}")


def write_results(
    out: str | None, root: Path, date: str, version: str, results: dict[str, Any]
) -> Path:
    """The variants' results as ``bench/results/<out>.json`` (default
    ``ranker_split-<root folder>-<version>``), named as every bench names its record."""
    return write_json(
        out or f"ranker_split-{root.name}-{version}",
        {"root": str(root), "date": date, "variants": results},
    )


if __name__ == "__main__":
    main()
