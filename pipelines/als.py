"""The ALS baseline: implicit-feedback matrix factorisation (Spark MLlib) in the two-tower space.

Retrieval quality only means something against a baseline that also learns from the clicks. ALS
(Hu, Koren & Volinsky 2008, ``pyspark.ml.recommendation.ALS(implicitPrefs=True)``) is the classic
one. To make it answer the same question as the two-tower model, users and placements are rows of
ONE factorisation against the ads: every clicked impression gives a ``(user, ad)`` entry and a
``(placement, ad)`` entry, so user and placement vectors live in the same space and a query is
``user_vector + placement_vector`` — the additive query of DESIGN.md, scored by ``query·ad``.

Only the training days of a features folder (contracts §3) are read, so the day being evaluated
never leaks in. Ads without a training interaction get no vector: ALS cannot place a brand-new ad,
which is the cold-start gap the feature-based towers close (the evaluation reports it).

Determinism: row and ad ids are indexed alphabetically (``StringIndexer``), the factor
initialisation is seeded and the block count is fixed, so the same folder and parameters give the
same vectors (bit-identical in local mode; a cluster's shuffle order can change the last float
bits of the sums).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pyspark.ml.feature import StringIndexer
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from candidates.store import EmbeddingTable, encode_ids

Source = Literal["retrieval", "ranking"]
SOURCE_TABLES: dict[str, str] = {"retrieval": "training/retrieval", "ranking": "training/ranking"}
USER_ROW = "user:"
PLACEMENT_ROW = "placement:"
"""Prefixes that keep user and placement ids apart in the one row space (``user:u1``)."""


@dataclass(frozen=True)
class AlsParams:
    """ALS hyper-parameters and the training table.

    Defaults from a small grid on generated data (8 days × 150k impressions, 7 training days,
    recall@500 of 2000 clicks of day 8): rank 32/reg 0.1/alpha 10 → 0.417; alpha 1 → 0.469;
    rank 16, reg 0.3, alpha 1 → 0.506 (rank 32: 0.511 at twice the cost; reg 0.6: 0.498).
    Label weighting on ``training/ranking`` measured worse and 3-5× slower: negative_weight 0.1
    → 0.443, 0.5 → 0.406 — so clicks of ``training/retrieval`` are the default. The grid was
    scored on the evaluated day itself; re-tune on an earlier day before trusting small gaps.
    """

    rank: int = 16
    reg: float = 0.3
    alpha: float = 1.0
    iterations: int = 10
    seed: int = 7
    source: Source = "retrieval"
    negative_weight: float = 0.0
    """``source="ranking"`` only: confidence of a shown-but-never-clicked pair (0 = ignore)."""
    blocks: int = 4
    """User and item blocks; fixed (not the cluster's parallelism), so results do not change."""


@dataclass(frozen=True)
class AlsVectors:
    """Trained ALS factors, one space: sorted ids + float32 vectors (``EmbeddingTable``) per entity.

    ``fallback_user`` / ``fallback_placement`` are the mean row vectors: an unknown user or
    placement is scored as the average one, which ranks ads by their overall appeal.
    """

    users: EmbeddingTable
    placements: EmbeddingTable
    ads: EmbeddingTable
    fallback_user: np.ndarray
    fallback_placement: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.ads.dim

    def query(self, user_id: str | None, placement_id: str | None) -> np.ndarray:
        """``user + placement`` vector, each part from its table or its fallback."""
        user = self.users.vector(user_id) if user_id is not None else None
        placement = self.placements.vector(placement_id) if placement_id is not None else None
        user = self.fallback_user if user is None else user
        placement = self.fallback_placement if placement is None else placement
        return (user + placement).astype(np.float32)


def interaction_ratings(
    rows: DataFrame, *, source: Source = "retrieval", negative_weight: float = 0.0
) -> DataFrame:
    """``(row, ad_id, rating)`` entries of the one user ∪ placement factorisation.

    Args:
        rows: impressions with ``user_id``, ``placement_id``, ``ad_id`` (and ``label`` when
            ``source`` is ``"ranking"``); ``"retrieval"`` rows are all clicks.
        source: which training table the rows come from.
        negative_weight: for ``"ranking"``, the rating of a pair shown ``n`` times and never
            clicked is ``-negative_weight·n`` (implicit ALS: preference 0, confidence
            ``1 + alpha·|rating|``); clicked pairs are rated by their click count.

    Returns:
        One entry per (row, ad) pair; ``row`` is ``user:<id>`` or ``placement:<id>``.
    """
    clicked = F.lit(1) if source == "retrieval" else F.col("label").cast("int")
    entries = rows.select(
        F.concat(F.lit(USER_ROW), F.col("user_id").cast("string")).alias("row"),
        F.col("ad_id").cast("string").alias("ad_id"),
        clicked.alias("clicked"),
    ).unionByName(
        rows.select(
            F.concat(F.lit(PLACEMENT_ROW), F.col("placement_id").cast("string")).alias("row"),
            F.col("ad_id").cast("string").alias("ad_id"),
            clicked.alias("clicked"),
        )
    )
    pairs = entries.groupBy("row", "ad_id").agg(
        F.sum("clicked").alias("clicks"), F.count(F.lit(1)).alias("shown")
    )
    rating = F.when(F.col("clicks") > 0, F.col("clicks").cast("float")).otherwise(
        (-negative_weight * F.col("shown")).cast("float")
    )
    # A zero rating says nothing implicit ALS does not already assume of unseen pairs.
    return pairs.select("row", "ad_id", rating.alias("rating")).filter(F.col("rating") != 0)


def train_als(
    spark: SparkSession,
    features_folder: Path,
    *,
    rank: int,
    reg: float,
    alpha: float,
    iterations: int,
    seed: int,
    source: Source = "retrieval",
    negative_weight: float = 0.0,
    blocks: int = 4,
) -> AlsVectors:
    """Fit implicit ALS on a features folder's training days; return users, placements and ads
    in one space (query = user + placement, score = query·ad).

    Raises:
        ValueError: an unknown ``source`` or a training table without interactions.
    """
    if source not in SOURCE_TABLES:
        raise ValueError(f"ALS source must be one of {sorted(SOURCE_TABLES)}, got {source!r}")
    columns = ["user_id", "placement_id", "ad_id"] + (["label"] if source == "ranking" else [])
    table = Path(features_folder) / SOURCE_TABLES[source]
    rows = spark.read.parquet(str(table)).select(*columns)
    ratings = interaction_ratings(rows, source=source, negative_weight=negative_weight).cache()
    try:
        if ratings.limit(1).count() == 0:
            raise ValueError(f"{table} has no interactions: ALS needs at least one click")
        indexer = StringIndexer(
            inputCols=["row", "ad_id"],
            outputCols=["row_index", "ad_index"],
            stringOrderType="alphabetAsc",  # deterministic ids, unlike frequency order with ties
        ).fit(ratings)
        indexed = indexer.transform(ratings).select(
            F.col("row_index").cast("int"), F.col("ad_index").cast("int"), "rating"
        )
        model = ALS(
            rank=rank,
            regParam=reg,
            alpha=alpha,
            maxIter=iterations,
            seed=seed,
            implicitPrefs=True,
            userCol="row_index",
            itemCol="ad_index",
            ratingCol="rating",
            numUserBlocks=blocks,
            numItemBlocks=blocks,
        ).fit(indexed)
        row_labels, ad_labels = (np.asarray(labels) for labels in indexer.labelsArray)
        row_ids, row_vectors = _factors(model.userFactors, row_labels, rank)
        ad_ids, ad_vectors = _factors(model.itemFactors, ad_labels, rank)
        entries = ratings.count()
    finally:
        ratings.unpersist()
    users = _split(row_ids, row_vectors, USER_ROW, "users")
    placements = _split(row_ids, row_vectors, PLACEMENT_ROW, "placements")
    params = {
        "rank": rank,
        "reg": reg,
        "alpha": alpha,
        "iterations": iterations,
        "seed": seed,
        "source": source,
        "negative_weight": negative_weight,
        "blocks": blocks,
    }
    return AlsVectors(
        users=users,
        placements=placements,
        ads=_table("ads", ad_ids, ad_vectors),
        fallback_user=_mean(users, rank),
        fallback_placement=_mean(placements, rank),
        params=params,
        counts={
            "users": len(users),
            "placements": len(placements),
            "ads": len(ad_ids),
            "entries": int(entries),
        },
    )


def train_als_with(spark: SparkSession, features_folder: Path, params: AlsParams) -> AlsVectors:
    """:func:`train_als` with an :class:`AlsParams` (how the evaluation runner calls it)."""
    return train_als(spark, features_folder, **asdict(params))


def _factors(factors: DataFrame, labels: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factor rows as (original ids, float32 [n, rank]); ``labels[i]`` is the id of index i."""
    frame = factors.select("id", "features").toPandas()
    index = frame["id"].to_numpy(dtype=np.int64)
    vectors = np.zeros((len(frame), rank), dtype=np.float32)
    if len(frame):
        vectors[:] = np.stack(frame["features"].to_numpy()).astype(np.float32)
    return labels[index], vectors


def _split(ids: np.ndarray, vectors: np.ndarray, prefix: str, name: str) -> EmbeddingTable:
    """The rows whose id starts with ``prefix``, prefix removed."""
    keep = np.char.startswith(ids.astype(str), prefix)
    return _table(name, ids[keep], vectors[keep], prefix)


def _table(name: str, ids: np.ndarray, vectors: np.ndarray, prefix: str = "") -> EmbeddingTable:
    """An id-sorted table (binary-search lookups, as in ``candidates.store``)."""
    plain = [str(i)[len(prefix) :] for i in ids]
    encoded = encode_ids(plain) if plain else np.array([], dtype="S1")
    order = np.argsort(encoded, kind="stable")
    return EmbeddingTable(name, encoded[order], np.ascontiguousarray(vectors[order]))


def _mean(table: EmbeddingTable, rank: int) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(rank, dtype=np.float32)
    return np.asarray(table.vectors, dtype=np.float64).mean(axis=0).astype(np.float32)
