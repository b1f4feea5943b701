"""``deepclick embed --date D``: batch-embed every user, placement and ad with the exported towers.

Spark runs each tower over its entity table with ``mapInPandas``, loading the SavedModel once per
partition, so the same job embeds millions of entities on a cluster. Every entity in the tables is
embedded, including ads and placements with no traffic yet (their vectors come from their
features). The driver then gathers the vectors into the mmappable tables of contracts §4 through
``candidates.store.publish_embeddings``, which publishes atomically.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from candidates.store import publish_embeddings
from deepclick import layout
from deepclick.settings import Settings
from pipelines.spark import get_spark

# entity table → (tower role, id column, fallback name in the embeddings contract)
ENTITY_TOWERS: dict[str, tuple[str, str, str | None]] = {
    "users": ("user", "user_id", "user"),
    "placements": ("context", "placement_id", "placement"),
    "ads": ("ad", "ad_id", None),
}
VECTOR_SCHEMA = T.StructType(
    [T.StructField("id", T.StringType()), T.StructField("vector", T.ArrayType(T.FloatType()))]
)


def embed_frame(frame: DataFrame, tower_path: str, key: str, columns: list[str]) -> DataFrame:
    """(id, vector) for every row of ``frame``, computed by the tower at ``tower_path``."""

    def embed(batches: Iterator):  # runs in the Spark Python workers
        from models.two_tower.export import load_tower

        tower = load_tower(tower_path)  # once per partition, not per batch
        for batch in batches:
            vectors = tower(batch, fill_missing=True)
            yield batch[[key]].rename(columns={key: "id"}).assign(vector=list(vectors))

    return frame.select(key, *[c for c in columns if c != key]).mapInPandas(embed, VECTOR_SCHEMA)


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
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fallbacks: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(
        dir=layout.artifacts(settings.root), prefix=".embed-"
    ) as scratch:
        for entity, (role, key, fallback) in ENTITY_TOWERS.items():
            tower = load_tower(towers / role)
            frame = spark.read.parquet(str(features / "entities" / entity))
            vectors = Path(scratch) / entity
            embedded = embed_frame(frame, str(towers / role), key, tower.feature_names)
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
