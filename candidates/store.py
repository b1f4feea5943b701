"""Embedding tables on disk: the contract between the embed job and every serving process.

The embed job (DESIGN.md, "pipelines: embed") writes one folder per version (docs/contracts.md §4);
the index build and every serving worker read it. Ids are stored sorted as fixed-width UTF-8 bytes
and vectors as a float32 matrix in the same order, both as plain ``.npy`` files opened with
``np.load(mmap_mode="r")``: the operating system keeps one copy in the page cache however many
worker processes map it, and an id is found by binary search over the mapped ids, so no worker
builds a per-process dict of millions of strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepclick.errors import DeepclickError
from deepclick.publish import publishing, read_manifest, verify
from deepclick.sorted_ids import sorted_rows

ENTITIES = ("users", "placements", "ads")
FALLBACK_ENTITIES = ("user", "placement")
METRIC = "dot"


class EmbeddingStoreError(DeepclickError, ValueError):
    """An embeddings folder or table breaks the §4 contract; the message names the file and rule."""


def ids_file(entity: str) -> str:
    return f"{entity}_ids.npy"


def vectors_file(entity: str) -> str:
    return f"{entity}_vectors.npy"


def fallback_file(entity: str) -> str:
    return f"fallback_{entity}.npy"


def encode_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids as a fixed-width UTF-8 byte array (``S<n>``), the on-disk and lookup representation.

    Empty ids and NUL characters are refused: numpy strips trailing NULs from ``S`` values, so such
    ids would not round-trip.
    """
    encoded = [str(i).encode("utf-8") for i in ids]
    for raw in encoded:
        if not raw or b"\x00" in raw:
            raise EmbeddingStoreError(f"id {raw!r} is empty or contains NUL; ids must be non-empty")
    width = max((len(raw) for raw in encoded), default=1)
    return np.array(encoded, dtype=f"S{width}")


@dataclass(frozen=True)
class EmbeddingTable:
    """One entity's ids (sorted, mmapped) and vectors (row i belongs to id i, mmapped)."""

    name: str
    ids: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def row(self, entity_id: str) -> int | None:
        """Row of ``entity_id`` or None; a binary search over the mapped ids (O(log n), no dict)."""
        row = int(self.rows([entity_id])[0])
        return None if row < 0 else row

    def rows(self, entity_ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 when absent (one vectorised binary search)."""
        return sorted_rows(self.ids, [str(i).encode("utf-8") for i in entity_ids])

    def vector(self, entity_id: str) -> np.ndarray | None:
        row = self.row(entity_id)
        return None if row is None else np.asarray(self.vectors[row])

    def id_at(self, row: int) -> str:
        return bytes(self.ids[row]).decode("utf-8")


def write_table(folder: Path, entity: str, ids: Sequence[str] | np.ndarray, vectors: Any) -> int:
    """Write ``<entity>_ids.npy`` sorted and ``<entity>_vectors.npy`` reordered to match.

    Callers may pass ids in any order; sorting here is what makes binary-search lookup valid.
    Duplicate ids are refused (a lookup could return either row). Returns the row count.
    """
    matrix = np.asarray(vectors, dtype=np.float32)
    encoded = encode_ids(ids)
    if matrix.ndim != 2 or matrix.shape[0] != encoded.shape[0]:
        raise EmbeddingStoreError(
            f"{entity}: vectors must be [n, dim] with one row per id; got {matrix.shape} "
            f"for {encoded.shape[0]} ids"
        )
    if not np.isfinite(matrix).all():
        raise EmbeddingStoreError(f"{entity}: vectors contain NaN or infinity")
    order = np.argsort(encoded, kind="stable")
    sorted_ids = encoded[order]
    if sorted_ids.shape[0] > 1:
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if dup.size:
            duplicate = bytes(sorted_ids[dup[0]]).decode("utf-8")
            raise EmbeddingStoreError(f"{entity}: duplicate id {duplicate!r}")
    np.save(folder / ids_file(entity), sorted_ids)
    np.save(folder / vectors_file(entity), np.ascontiguousarray(matrix[order]))
    return int(sorted_ids.shape[0])


def write_fallback(folder: Path, entity: str, vector: Any, dim: int) -> None:
    """Write the vector used for an unknown ``entity`` ("user" or "placement")."""
    fallback = np.asarray(vector, dtype=np.float32)
    if fallback.shape != (dim,):
        raise EmbeddingStoreError(f"fallback_{entity}: shape {fallback.shape}, expected ({dim},)")
    np.save(folder / fallback_file(entity), fallback)


def publish_embeddings(
    parent: Path,
    version: str,
    tables: Mapping[str, tuple[Sequence[str] | np.ndarray, Any]],
    fallbacks: Mapping[str, Any],
    *,
    inputs: Mapping[str, Any] | None = None,
    update_current: bool = True,
) -> Path:
    """Write and atomically publish one embeddings version (contracts §4); return its folder.

    ``tables`` maps each of users/placements/ads to ``(ids, vectors)``; ``fallbacks`` maps
    user/placement to the vector served for an unknown id (e.g. the tower's output for empty
    features, or the mean vector). The embed job calls this with its batch outputs.
    """
    missing = [e for e in ENTITIES if e not in tables] + [
        f"fallback_{e}" for e in FALLBACK_ENTITIES if e not in fallbacks
    ]
    if missing:
        raise EmbeddingStoreError(f"embeddings {version}: missing {', '.join(missing)}")
    dims = {e: np.asarray(tables[e][1]).shape[-1] for e in ENTITIES}
    if len(set(dims.values())) != 1:
        raise EmbeddingStoreError(f"embeddings {version}: all tables need one dim, got {dims}")
    dim = int(dims["ads"])
    with publishing(parent, version, update_current=update_current) as staging:
        counts = {e: write_table(staging.path, e, *tables[e]) for e in ENTITIES}
        for entity in FALLBACK_ENTITIES:
            write_fallback(staging.path, entity, fallbacks[entity], dim)
        staging.manifest.update(
            {"dim": dim, "metric": METRIC, "inputs": dict(inputs or {}), "counts": counts}
        )
    return parent / version


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EmbeddingStoreError(f"{path} is missing (contracts §4 lists it)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # truncated or not an .npy file
        raise EmbeddingStoreError(f"{path} is not a readable .npy file: {exc}") from None


def read_table(folder: Path, entity: str, *, check_sorted: bool = True) -> EmbeddingTable:
    """Open one entity's table memory-mapped, checking shapes, dtypes and (optionally) sort order.

    The sort check reads the ids once (tens of MB at most); it guards the binary search, which would
    silently miss ids in an unsorted file.
    """
    ids = _load_npy(folder / ids_file(entity))
    vectors = _load_npy(folder / vectors_file(entity))
    if ids.ndim != 1 or ids.dtype.kind != "S":
        raise EmbeddingStoreError(
            f"{folder / ids_file(entity)}: ids must be 1-D fixed-width bytes (S<n>), "
            f"got {ids.dtype} with shape {ids.shape}"
        )
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise EmbeddingStoreError(
            f"{folder / vectors_file(entity)}: vectors must be float32 [n, dim], "
            f"got {vectors.dtype} with shape {vectors.shape}"
        )
    if vectors.shape[0] != ids.shape[0]:
        raise EmbeddingStoreError(
            f"{folder / vectors_file(entity)} has {vectors.shape[0]} rows but "
            f"{ids_file(entity)} has {ids.shape[0]} ids: row i must belong to id i"
        )
    if check_sorted and ids.shape[0] > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        raise EmbeddingStoreError(
            f"{folder / ids_file(entity)}: ids must be sorted and unique (binary-search lookup)"
        )
    return EmbeddingTable(entity, ids, vectors)


@dataclass(frozen=True)
class Embeddings:
    """One published embeddings version, every table memory-mapped."""

    folder: Path
    manifest: dict[str, Any]
    users: EmbeddingTable
    placements: EmbeddingTable
    ads: EmbeddingTable
    fallback_user: np.ndarray
    fallback_placement: np.ndarray

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


def read_embeddings(folder: Path, *, verify_checksums: bool = True) -> Embeddings:
    """Open a published embeddings folder (contracts §4) with every table mmapped.

    ``verify_checksums`` hashes every file against the manifest (deepclick.publish.verify): worth
    its cost at start-up, since a silently altered vector file would serve wrong ads for a day.
    """
    manifest = verify(folder) if verify_checksums else read_manifest(folder)
    if manifest.get("metric", METRIC) != METRIC:
        raise EmbeddingStoreError(
            f"{folder}/manifest.json: metric {manifest.get('metric')!r}; candidates expects "
            f"{METRIC!r} (score = user·ad + context·ad)"
        )
    dim = manifest.get("dim")
    if not isinstance(dim, int) or dim < 1:
        raise EmbeddingStoreError(f"{folder}/manifest.json: 'dim' must be a positive integer")
    tables = {e: read_table(folder, e) for e in ENTITIES}
    for entity, table in tables.items():
        if table.dim != dim:
            raise EmbeddingStoreError(
                f"{folder / vectors_file(entity)} has dim {table.dim} but the manifest says {dim}"
            )
    fallbacks = {}
    for entity in FALLBACK_ENTITIES:
        vector = _load_npy(folder / fallback_file(entity))
        if vector.shape != (dim,):
            raise EmbeddingStoreError(
                f"{folder / fallback_file(entity)} has shape {vector.shape}, expected ({dim},)"
            )
        fallbacks[entity] = vector.astype(np.float32)
    return Embeddings(
        folder,
        manifest,
        tables["users"],
        tables["placements"],
        tables["ads"],
        fallbacks["user"],
        fallbacks["placement"],
    )
