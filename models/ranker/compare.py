"""Architecture comparison: DCN-v2 vs DeepFM vs the LR baseline on one features folder.

The choice of the default architecture should rest on a measurement, not on a paper: this trains
each architecture with the same settings (and the same seeds) on the same split and scores them on
the folder's evaluation day, the way the evaluation report does. Run it on a new dataset before
trusting the default, e.g.::

    from models.feature_spec import load_feature_spec
    from models.ranker.compare import compare_architectures
    compare_architectures(load_feature_spec("var/warehouse/features/20240105"), settings.ranker)
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import Any

import numpy as np
import pandas as pd

from deepclick.settings import RankerSettings
from models.evaluation.ranking import auc, calibration_ratio, logloss, normalized_entropy
from models.feature_spec import FeatureSpec
from models.ranker.inputs import SimilarityProvider
from models.ranker.model import ARCHITECTURES
from models.ranker.train import train_ranker


def _scores(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, p),
        "logloss": logloss(labels, p),
        "normalized_entropy": normalized_entropy(labels, p),
        "calibration_ratio": calibration_ratio(labels, p),
    }


def compare_architectures(
    spec: FeatureSpec,
    settings: RankerSettings,
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    seeds: Sequence[int] | None = None,
    eval_rows: pd.DataFrame | None = None,
    similarity: SimilarityProvider | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluation-day metrics per architecture (mean and per-seed AUC) plus the LR baseline.

    Args:
        spec: a features folder's spec; its ``eval`` table is the test set unless ``eval_rows``.
        settings: shared settings; only ``architecture`` and ``seed`` vary.
        architectures: the ones to compare.
        seeds: one run per seed and architecture (default: ``settings.seed``).
        eval_rows: another test set.
        similarity: two-tower scores for every run.
    """
    rows = eval_rows if eval_rows is not None else pd.read_parquet(spec.table_path("eval"))
    labels = rows[spec.label].to_numpy()
    results: dict[str, dict[str, Any]] = {}
    for arch in architectures:
        runs = []
        for i, seed in enumerate(seeds or [settings.seed]):
            run_settings = settings.model_copy(
                update={"architecture": arch, "seed": seed, "baseline": not results and i == 0}
            )
            trained = train_ranker(spec, run_settings, similarity=similarity, progress=False)
            runs.append(
                {
                    **_scores(labels, trained.predict(rows)),
                    "seconds": trained.metrics["train_seconds"],
                }
            )
            if trained.baseline is not None:
                results["logistic_regression"] = _scores(labels, trained.baseline.predict(rows))
        results[arch] = {k: mean(r[k] for r in runs) for k in runs[0]}
        results[arch]["auc_per_seed"] = [r["auc"] for r in runs]
    return results
