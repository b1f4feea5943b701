"""``deepclick index --date D``: build, measure and publish the ANNOY index over D's ad vectors.

Reads the embeddings published for D and the popular-ads table of D's features, and hands them to
``candidates.index.build_index``, which measures ANN recall against exact search and refuses to
publish below the configured floor.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq

from candidates.index import build_index
from deepclick.publish import resolve, version_for
from deepclick.settings import Settings
from pipelines.towers import features_folder


def popularity_rows(features: Path) -> list[tuple[str, str, int]]:
    """(placement_id, ad_id, clicks) rows of the features' popularity table."""
    table = pq.read_table(features / "popularity", columns=["placement_id", "ad_id", "clicks"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def run_index(settings: Settings, date: dt.date) -> Path:
    version = version_for(date)
    embeddings = resolve(settings.artifacts / "embeddings", version, what="embeddings")
    cfg = settings.index
    return build_index(
        embeddings,
        settings.artifacts / "index",
        popularity=popularity_rows(features_folder(settings, date)),
        metric=cfg.metric,
        n_trees=cfg.n_trees,
        search_k=cfg.search_k,
        recall_k=cfg.recall_k,
        recall_queries=cfg.recall_queries,
        recall_floor=cfg.recall_floor,
        seed=cfg.seed,
        tune_search_k=cfg.tune_search_k,
        version=version,
    )
