"""``deepclick embed --date D``: batch-embed every user, placement and ad with the exported towers.

Spark runs each tower over its entity table with ``mapInPandas``, loading the SavedModel once per
partition, so the same job embeds millions of entities on a cluster. On a local master the driver
embeds the tables itself (``two_tower.embed_on``): Spark's Python workers would share the same
cores and each pay a TensorFlow import and a SavedModel load (14-18 s of CPU per day on the daily
test's world of ~600 entities, about 1 s in the driver). Every entity in the tables is
embedded, including ads and placements with no traffic yet (their vectors come from their
features). An ad without rows in the training window is embedded with the "no id" value
(``models.two_tower.preprocessing.NO_ID``: the zeroed id that id dropout trained) instead of its
unknown id, whose OOV row the rarest ads trained. The driver then gathers the vectors into the
mmappable tables of contracts §4 through ``candidates.store.publish_embeddings``, which publishes
atomically.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from candidates.store import publish_embeddings
from deepclick import layout
from deepclick.settings import Settings
from pipelines.spark import get_spark

if TYPE_CHECKING:
    from models.two_tower.export import LoadedTower

# entity table → (tower role, id column, fallback name in the embeddings contract)
ENTITY_TOWERS: dict[str, tuple[str, str, str | None]] = {
    "users": ("user", "user_id", "user"),
    "placements": ("context", "placement_id", "placement"),
    "ads": ("ad", "ad_id", None),
}
DRIVER_BATCH_ROWS = 65_536  # rows read and embedded at a time in the driver: bounded memory
VECTOR_SCHEMA = T.StructType(
    [T.StructField("id", T.StringType()), T.StructField("vector", T.ArrayType(T.FloatType()))]
)


def embed_frame(
    frame: DataFrame,
    tower_path: str,
    key: str,
    columns: list[str],
    no_id: Collection[str] = frozenset(),
) -> DataFrame:
    """(id, vector) for every row of ``frame``, computed by the tower at ``tower_path``; the
    rows whose ``key`` is in ``no_id`` are embedded as "no id" (:func:`without_ids`)."""
    no_id = frozenset(no_id)

    def embed(batches: Iterator):  # runs in the Spark Python workers
        from models.two_tower.export import load_tower

        tower = load_tower(tower_path)  # once per partition, not per batch
        for batch in batches:
            vectors = tower(without_ids(batch, key, no_id), fill_missing=True)
            yield batch[[key]].rename(columns={key: "id"}).assign(vector=list(vectors))

    return frame.select(key, *[c for c in columns if c != key]).mapInPandas(embed, VECTOR_SCHEMA)


def embed_in_driver(
    folder: Path, tower: LoadedTower, key: str, no_id: Collection[str] = frozenset()
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 ``[n, dim]``) for every row of the parquet entity table ``folder``, embedded
    in this process in bounded batches: what ``embed_frame`` computes, without Spark workers."""
    no_id = frozenset(no_id)
    columns = [key, *[c for c in tower.feature_names if c != key]]
    dataset = ds.dataset(str(folder), format="parquet")
    absent = [c for c in columns if c not in dataset.schema.names]
    if absent:
        raise KeyError(f"{folder}: the tower needs columns {', '.join(absent)}, which are absent")
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    for batch in dataset.to_batches(columns=columns, batch_size=DRIVER_BATCH_ROWS):
        frame = batch.to_pandas()
        ids.append(frame[key].astype(str).to_numpy())
        vectors.append(tower(without_ids(frame, key, no_id), fill_missing=True))
    if not ids:
        return np.zeros(0, dtype=str), np.zeros((0, tower.dim), np.float32)
    return np.concatenate(ids), np.concatenate(vectors).astype(np.float32, copy=False)


def without_ids(frame: pd.DataFrame, key: str, no_id: frozenset[str]) -> pd.DataFrame:
    """``frame`` with the ``key`` of the rows in ``no_id`` replaced by
    :data:`~models.two_tower.preprocessing.NO_ID` (a copy; ``frame`` itself when none is)."""
    if not no_id:
        return frame
    from models.two_tower.preprocessing import NO_ID

    hit = frame[key].astype(str).isin(no_id).to_numpy()
    if not hit.any():
        return frame
    return frame.assign(**{key: np.where(hit, NO_ID, frame[key].astype(str))})


def ads_without_training_rows(features: Path) -> frozenset[str]:
    """The catalogue's ads with no row in the training window (``training/ranking``): the towers
    never saw them, and neither did the ranker; the index gives them its fresh slots."""
    trained = pq.read_table(features / "training" / "ranking", columns=["ad_id"]).column("ad_id")
    catalogue = pq.read_table(features / "entities" / "ads", columns=["ad_id"]).column("ad_id")
    seen = set(trained.unique().to_pylist())
    return frozenset(str(a) for a in catalogue.to_pylist() if a not in seen)


def embeds_in_driver(settings: Settings, spark: SparkSession) -> bool:
    """Whether the embed stage runs the towers in the driver (see ``two_tower.embed_on``)."""
    where = settings.two_tower.embed_on
    return where == "driver" or (where == "auto" and spark.sparkContext.master.startswith("local"))


def _read_vectors(folder: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(folder)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(str)
    flat = table.column("vector").combine_chunks().flatten().to_numpy()
    return ids, flat.astype(np.float32).reshape(len(ids), dim)


def run_embed(
    settings: Settings,
    *,
    features: Path,
    towers: Path,
    out: Path,
    upstream: Mapping[str, Mapping[str, Any]],
    spark: SparkSession | None = None,
) -> Path:
    """Embed the entity tables of the ``features`` folder with the ``towers`` and publish the
    vectors as ``out`` (``<parent>/<version>``, named by the caller); return ``out``.

    ``upstream`` holds the manifests of ``features`` and ``towers`` that the caller already read
    (the lifecycle's embed stage fingerprints them), recorded as the embeddings' inputs.
    """
    from models.two_tower.export import load_tower

    spark = spark or get_spark(settings.spark)
    in_driver = embeds_in_driver(settings, spark)
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fallbacks: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(
        dir=layout.artifacts(settings.root), prefix=".embed-"
    ) as scratch:
        for entity, (role, key, fallback) in ENTITY_TOWERS.items():
            tower = load_tower(towers / role)
            table = features / "entities" / entity
            no_id = ads_without_training_rows(features) if entity == "ads" else frozenset()
            if in_driver:
                tables[entity] = embed_in_driver(table, tower, key, no_id)
            else:
                vectors = Path(scratch) / entity
                frame = spark.read.parquet(str(table))
                embedded = embed_frame(frame, str(towers / role), key, tower.feature_names, no_id)
                embedded.write.parquet(str(vectors))
                tables[entity] = _read_vectors(vectors, tower.dim)
            if fallback is not None:
                fallbacks[fallback] = tower.fallback()
    return publish_embeddings(
        out.parent,
        out.name,
        tables,
        fallbacks,
        inputs={
            "features": upstream["features"]["version"],
            "towers": upstream["towers"]["version"],
            "towers_created_at": upstream["towers"]["created_at"],
        },
    )
