"""Recall@K of the clicks of the evaluation day: two-tower retrieval against popularity.

Queries are built the way serving builds them — the published user vector plus the published
placement vector (``user·ad + context·ad``, request time marginalised) — and ranked against every
ad of ``entities/ads`` (the catalogue as of the target day, new ads included) by exact dot
product. The popularity baseline ranks the overall ``popularity`` list (``__all__``) for every
query. Both are scored on the same clicked impressions of the ``eval`` table, so the ratio of the
two is the "≥ 2× a popularity baseline" target of DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from deepclick.topk import exact_top_k
from models.evaluation.retrieval import recall_at_k
from models.feature_spec import ROLE_KEY
from models.two_tower.train import TrainedTowers

ALL_PLACEMENTS = "__all__"


def click_recall(
    trained: TrainedTowers, ks: Iterable[int] = (10, 50, 100, 500), *, table: str = "eval"
) -> dict[str, dict[int, float]]:
    """``{"two_tower": {K: recall}, "popularity": {K: recall}}`` on the clicks of ``table``."""
    spec = trained.spec
    ks = sorted(set(ks))
    clicks = pd.read_parquet(spec.table_path(table))
    clicks = clicks[clicks[spec.label] == 1].reset_index(drop=True)
    ads = pd.read_parquet(spec.table_path(spec.entities["ad"].table))
    ad_ids = ads[ROLE_KEY["ad"]].astype(str).to_numpy()
    relevant = clicks[ROLE_KEY["ad"]].astype(str).to_numpy()
    queries = trained.embed("user", clicks) + trained.embed("context", clicks)
    ranked = ad_ids[exact_top_k(queries, trained.embed("ad", ads), max(ks))]
    popular = pd.read_parquet(spec.table_path("popularity"))
    popular = popular[popular["placement_id"] == ALL_PLACEMENTS].sort_values("rank")
    top = popular["ad_id"].astype(str).to_numpy()[: max(ks)]
    return {
        "two_tower": recall_at_k(ranked, relevant, ks),
        "popularity": recall_at_k(np.tile(top, (len(relevant), 1)), relevant, ks),
    }
