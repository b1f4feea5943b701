"""The ANNOY index over ad vectors: build, measure, publish, and open for serving.

Candidate selection needs the ads with the largest ``query·ad`` (the two towers score by dot
product) among up to millions of ads in a few milliseconds. ANNOY answers approximately, so every
build measures its recall@K against exact search on sampled queries and refuses to publish below a
floor; the measured value travels in the manifest (contracts §5).

Metric. ANNOY's ``dot`` metric applies the Bachrach et al. MIPS→cosine reduction inside its
trees; the alternative is ``angular`` over vectors augmented by hand (ads get an extra coordinate
``sqrt(max_norm² − ‖a‖²)``, queries get 0, so every ad has norm ``max_norm`` and the cosine order
equals the dot order). On synthetic vectors (``bench/candidates.py``: 64-dim clustered Gaussian
mixture, 50 trees) ``dot`` looked better at the smallest ``search_k`` reaching recall@100 ≥ 0.95:

    ads   dot: search_k  recall  p50     angular: search_k  recall  p50
    100k        5 000    0.978   0.48 ms         10 000     0.964   1.06 ms
    1M         40 000    0.981   3.3 ms          40 000     0.978   4.6 ms

but on the vectors the two towers actually produce (10M-impression marketplace, 126,840 ads,
dim 32, ad norms 1.0-8.2, user+placement queries) ``dot`` collapses and ``angular`` does not:

    recall@100 at search_k    5 000   20 000   80 000   320 000
    dot, 50 trees             0.106    0.259    0.577     0.986
    angular, 50 trees         0.780    0.872    0.937     0.983
    angular, 100 trees        (10 000: 0.869)   0.907 at 1.9 ms/query

so ``angular`` with 100 trees is the default (IndexSettings), chosen on the real geometry; ``dot``
stays available. Whatever the metric, the effort needed grows with the catalogue — see
``tune_search_k`` in :func:`build_index`. (At that size an exact numpy scan of 32-dim vectors
takes 0.3 ms per query: ANNOY earns its place as the catalogue and the dimension grow — at 1M
64-dim ads exact search takes 18 ms.)

Serving opens the index with ``AnnoyIndex.load(prefault=False)`` — a read-only shared mmap, one
copy in the page cache for all worker processes — after checking that the file's size agrees with
the manifest's dim, metric and node count, that the id map has one id per item, and (by default)
the checksums: ANNOY trusts the file, and a truncated or foreign file would crash a worker rather
than fail cleanly.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from annoy import AnnoyIndex
from threadpoolctl import threadpool_limits

from deepclick.errors import DeepclickError
from deepclick.layout import MANIFEST
from deepclick.publish import PublishError, Staging, checksums, publishing, read_manifest, verify
from deepclick.topk import ann_recall, exact_top_k, top_rows

from .funnel import FunnelParams, popularity_prior
from .popular import PopularAds, rank_popular, read_popular, write_popular
from .store import Embeddings, EmbeddingStoreError, ids_file, read_embeddings

Metric = Literal["dot", "angular"]
METRICS: tuple[Metric, ...] = ("dot", "angular")
DEFAULT_METRIC: Metric = "angular"

ANN_FILE = "ads.ann"
IDS_FILE = ids_file("ads")
POPULAR_FILE = "popular.json"
PRIOR_FILE = "prior.npy"
FRESH_FILE = "fresh.npy"
"""Rows of the ads without rows in the training window, ascending int64: the fresh slots'
pool (``candidates.funnel``)."""
COLUMNS_FILE = "ads_columns.npy"
"""The ad vectors column by column: ``[dim, ads]`` float32, ``ads_vectors.npy`` transposed.
Serving's exact scan multiplies its transpose — the same matrix, column-major — because BLAS's
column kernel (gemv "N", one axpy per dimension) streams it about 3× faster than the row kernel
does the row-major table: 0.49 vs 1.45 ms per 100k × 32 query, one thread (issue 14). Mapped
read-only like every other file, so the workers share one copy."""
SEARCH_TIMING_QUERIES = 50
"""Sample queries timed per search kind when a build chooses between exact and ANN search."""
SEARCH_PARITY_RECALL = 0.99
"""ANNOY competes with the exact scan (recall 1.0) only at this recall@n or above."""


class CandidateIndexError(DeepclickError, ValueError):
    """An index folder breaks the contracts §5 rules; the message names the file and the rule."""


def annoy_dim(dim: int, metric: Metric) -> int:
    """Dimension ANNOY stores: ``angular`` carries the extra MIPS coordinate."""
    return dim + 1 if metric == "angular" else dim


def node_bytes(dim: int, metric: Metric) -> int:
    """Size of one ANNOY node on disk (annoylib.h, int32 ids, float32 values): a descendant count
    and two children (12 bytes), ``dot`` adds its stored norm factor (4), then the vector."""
    header = 16 if metric == "dot" else 12
    return header + 4 * annoy_dim(dim, metric)


def mips_augment(vectors: np.ndarray) -> np.ndarray:
    """Ads as ``[a, sqrt(max_norm² − ‖a‖²)]``: equal norms, so cosine order = dot order for queries
    augmented with 0 (Bachrach et al. 2014). Used by the ``angular`` metric."""
    ads = np.asarray(vectors, dtype=np.float32)
    sq = np.einsum("ij,ij->i", ads, ads, dtype=np.float64)
    extra = np.sqrt(np.maximum(sq.max(initial=0.0) - sq, 0.0)).astype(np.float32)
    return np.hstack([ads, extra[:, None]])


def as_query(vector: np.ndarray, metric: Metric) -> np.ndarray:
    """A query in the index's space: the augmented coordinate of a query is 0."""
    query = np.asarray(vector, dtype=np.float32)
    return np.append(query, np.float32(0.0)) if metric == "angular" else query


def build_annoy(
    vectors: np.ndarray, *, metric: Metric, n_trees: int, seed: int, n_jobs: int = 1
) -> AnnoyIndex:
    """An in-memory ANNOY forest where item i is row i of ``vectors``.

    With ``n_jobs=1`` a rebuild from the same vectors and seed is byte-identical (stage
    idempotency); with more threads ANNOY seeds each thread separately, so the neighbours are
    reproducible but the node order, hence the checksum, is not.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    items = mips_augment(vectors) if metric == "angular" else np.asarray(vectors, np.float32)
    index = AnnoyIndex(items.shape[1], metric)
    index.set_seed(seed)
    for i in range(items.shape[0]):
        index.add_item(i, items[i])
    index.build(n_trees, n_jobs=n_jobs)
    return index


def loaded_trees(path: Path, dim: int, metric: Metric) -> int:
    """The tree count ANNOY reports for a saved file when a reader loads it."""
    forest = AnnoyIndex(annoy_dim(dim, metric), metric)
    forest.load(str(path))
    try:
        return int(forest.get_n_trees())
    finally:
        forest.unload()


def exact_search(vectors: np.ndarray, query: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` largest ``query·ad``, best first (ties: lower row first): one BLAS
    matrix-vector product over the (mapped) vectors and a partial sort."""
    return top_rows(np.asarray(vectors) @ np.asarray(query, dtype=np.float32), n)


def measure_search(
    vectors: np.ndarray,
    index: AnnoyIndex,
    queries: np.ndarray,
    n: int,
    *,
    metric: Metric,
    search_k: int,
    repeats: int = 3,
    parity_recall: float = SEARCH_PARITY_RECALL,
) -> dict[str, Any]:
    """Which search serving should use for this catalogue and dimension, by timing both on the
    build's sample queries at ``n`` neighbours (what a request asks for), one thread each (as a
    serving worker runs them).

    The two are compared at (almost) the same answer and by CPU time: ANNOY's effort starts at
    what serving would use (``search_k``, at least ``n_trees * n``) and doubles until its
    recall@``n`` against the exact top ``n`` reaches ``parity_recall`` (or the search is
    exhaustive), and that effort is timed. Timing ANNOY at the effort tuned for a smaller k
    would compare a recall@500 far below 1.0 with the exact scan's 1.0 (issue 14). ANNOY wins
    only when it is faster *and* reached the parity recall; ``search_k`` records the effort
    serving then uses.

    ``crossing_ads`` is the catalogue size at which the exact scan (linear in the ads) would
    cost what ANNOY costs here; ANNOY's effort for the same recall grows with the catalogue too,
    so the true crossing lies beyond it (a lower bound).
    """
    n = min(n, vectors.shape[0])
    trees = index.get_n_trees()
    exhaustive = max(trees * vectors.shape[0], 1)
    prepared = [as_query(q, metric) for q in queries]
    truth = exact_top_k(queries, vectors, n)
    effort = min(max(search_k, trees * n), exhaustive)
    while True:
        found = [index.get_nns_by_vector(q, n, search_k=effort) for q in prepared]
        recall = ann_recall(found, truth, items=vectors, queries=queries)
        if recall >= parity_recall or effort >= exhaustive:
            break
        effort = min(2 * effort, exhaustive)

    def per_query_ms(call: Callable[[int], object]) -> float:
        """CPU time of this thread (both searches run on the calling thread), so that other
        jobs on a busy build machine do not count; best of a few passes."""
        best = float("inf")
        for _ in range(repeats):
            started = time.thread_time()
            for i in range(len(queries)):
                call(i)
            best = min(best, (time.thread_time() - started) * 1000.0 / max(len(queries), 1))
        return best

    scan = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).T).T  # as served
    with threadpool_limits(limits=1, user_api="blas"):  # as a serving worker runs it
        exact_ms = per_query_ms(lambda i: exact_search(scan, queries[i], n))
    ann_ms = per_query_ms(lambda i: index.get_nns_by_vector(prepared[i], n, search_k=effort))
    ann_wins = ann_ms < exact_ms and recall >= parity_recall
    return {
        "mode": "ann" if ann_wins else "exact",
        "n": n,
        "exact_ms": round(exact_ms, 4),
        "ann_ms": round(ann_ms, 4),
        "search_k": int(effort),
        "ann_recall": round(recall, 6),
        "parity_recall": parity_recall,
        "crossing_ads": int(vectors.shape[0] * ann_ms / exact_ms) if exact_ms > 0 else None,
    }


def search_effort(search_k: int, n_trees: int, n: int) -> int:
    """ANNOY's ``search_k`` for a request of ``n``: the configured value, but never below ANNOY's
    own default ``n_trees * n``, so asking for more candidates than recall was measured at does
    not search relatively less. ``-1`` keeps ANNOY's default."""
    return max(search_k, n_trees * n) if search_k > 0 else -1


def ann_top_k(
    index: AnnoyIndex, queries: np.ndarray, k: int, *, metric: Metric, search_k: int = -1
) -> list[list[int]]:
    effort = search_effort(search_k, index.get_n_trees(), k)
    return [index.get_nns_by_vector(as_query(q, metric), k, search_k=effort) for q in queries]


def sample_queries(embeddings: Embeddings, n: int, seed: int) -> np.ndarray:
    """Queries formed like real ones: a random user's vector plus a random placement's.

    Without users or placements (a fresh catalogue) it uses ad-like vectors — random ads plus
    Gaussian noise at half the per-dimension spread — so recall is still measured near the data.
    """
    rng = np.random.default_rng(seed)
    users, placements, ads = embeddings.users, embeddings.placements, embeddings.ads
    if len(users) and len(placements):
        u = users.vectors[rng.integers(0, len(users), n)]
        p = placements.vectors[rng.integers(0, len(placements), n)]
        return (u + p).astype(np.float32)
    rows = ads.vectors[rng.integers(0, len(ads), n)]
    spread = np.asarray(ads.vectors[: min(len(ads), 10_000)]).std(axis=0)
    return (rows + 0.5 * spread * rng.standard_normal(rows.shape)).astype(np.float32)


def build_index(
    embeddings_folder: Path,
    index_parent: Path,
    *,
    popularity: Iterable[tuple[str, str, float]] = (),
    metric: Metric = DEFAULT_METRIC,
    n_trees: int = 100,
    search_k: int = -1,
    recall_k: int = 100,
    recall_queries: int = 200,
    recall_floor: float = 0.9,
    popular_size: int = 500,
    seed: int = 7,
    n_jobs: int = 1,
    tune_search_k: bool = False,
    version: str | None = None,
    update_current: bool = True,
    clicks: Mapping[str, float] | None = None,
    trained_ads: Collection[str] | None = None,
    funnel: FunnelParams | None = None,
    check: Callable[[CandidateIndex], dict[str, Any]] | None = None,
    search_n: int = 500,
) -> Path:
    """Build the ANNOY index for one embeddings version and publish it (contracts §5).

    ``popularity`` rows are ``(placement_id, ad_id, clicks)`` (contracts §3, ``__all__`` for the
    overall list). The version defaults to the embeddings version. Recall@``recall_k`` is measured
    on the saved file with ``search_k``, exactly as serving will query it; below ``recall_floor``
    nothing is published (PublishError) and the previous CURRENT stays. Returns the folder.

    The search effort a recall needs grows with the catalogue (bench/candidates.py: at 1M ads the
    default ``n_trees * k`` gives recall@100 ≈ 0.45). With ``tune_search_k`` a build below the
    floor doubles ``search_k`` until the floor is met (at most up to an exhaustive search) and
    records the value it settled on, which serving then uses.

    ``clicks`` (ad id → training clicks) give every ad its popularity prior ``log(clicks +
    smoothing)`` (``prior.npy``, row i = ad i), which serving adds to ``query·ad`` with the weight
    of ``funnel`` (recorded in the manifest, so serving scores exactly as the build was checked).
    Ads missing from ``trained_ads`` (the ads with rows in the training window) are the fresh
    ones (``fresh.npy``) that get the funnel's fresh slots; without ``trained_ads`` none is fresh.
    ``check`` gets the staged index before it is published and returns numbers for the manifest's
    ``funnel`` section; raising refuses the index (nothing published, CURRENT stays).

    The manifest's ``search`` section records which search serving should use for this
    catalogue and dimension (:func:`measure_search`, timed at ``search_n`` neighbours): exact
    where it is faster at recall 1.0, ANNOY beyond the crossing point.
    """
    embeddings = read_embeddings(embeddings_folder)
    ads = embeddings.ads
    if len(ads) == 0:
        raise EmbeddingStoreError(f"{embeddings_folder}: no ads to index")
    popular = rank_popular(popularity, top_n=popular_size, keep=lambda a: ads.row(a) is not None)
    queries = sample_queries(embeddings, recall_queries, seed)
    k = min(recall_k, len(ads))
    exact = exact_top_k(queries, ads.vectors, k)

    def refuse_below_floor(staging: Staging) -> None:
        recall = staging.manifest["ann_recall_at_k"]
        if recall < recall_floor:
            raise PublishError(
                f"index {staging.version}: ANN recall@{k} = {recall:.4f} is below the floor "
                f"{recall_floor} ({metric}, n_trees={n_trees}, search_k="
                f"{staging.manifest['search_k']}); not "
                "published — raise n_trees or search_k"
            )

    funnel = funnel or FunnelParams()
    version = version or embeddings.version

    def validate(staging: Staging) -> None:
        refuse_below_floor(staging)
        if check is not None:
            staged = open_staged_index(staging)
            try:
                staging.manifest["funnel"]["check"] = check(staged)
            finally:
                staged.close()

    with publishing(
        index_parent, version, validate=validate, update_current=update_current
    ) as staging:
        started = time.perf_counter()
        index = build_annoy(ads.vectors, metric=metric, n_trees=n_trees, seed=seed, n_jobs=n_jobs)
        build_seconds = time.perf_counter() - started
        index.save(str(staging.path / ANN_FILE))  # re-opens the saved file as a read-only mmap
        found = ann_top_k(index, queries, k, metric=metric, search_k=search_k)
        recall = ann_recall(found, exact, items=ads.vectors, queries=queries)
        exhaustive = n_trees * len(ads)
        while tune_search_k and recall < recall_floor and search_k < exhaustive:
            search_k = min(2 * max(search_k, n_trees * k), exhaustive)
            found = ann_top_k(index, queries, k, metric=metric, search_k=search_k)
            recall = ann_recall(found, exact, items=ads.vectors, queries=queries)
        search = measure_search(
            ads.vectors, index, queries[:SEARCH_TIMING_QUERIES], search_n,
            metric=metric, search_k=search_k,
        )  # fmt: skip
        index.unload()
        # Opened the way readers open it: with a catalogue that fits in one leaf, ANNOY's loader
        # counts a different number of roots than were built (1 ad, 100 trees: 201), so the
        # count readers check against is the one a fresh load reports.
        ann_trees = loaded_trees(staging.path / ANN_FILE, embeddings.dim, metric)
        shutil.copyfile(embeddings_folder / IDS_FILE, staging.path / IDS_FILE)
        write_popular(staging.path / POPULAR_FILE, popular)
        np.save(staging.path / COLUMNS_FILE, np.ascontiguousarray(np.asarray(ads.vectors).T))
        prior = popularity_prior(ads.ids, clicks or {}, funnel.prior_smoothing)
        np.save(staging.path / PRIOR_FILE, prior, allow_pickle=False)
        fresh = fresh_rows(ads.ids, trained_ads)
        np.save(staging.path / FRESH_FILE, fresh, allow_pickle=False)
        ann_size = (staging.path / ANN_FILE).stat().st_size
        staging.manifest.update(
            {
                "embedding_version": embeddings.version,
                "metric": metric,
                "dim": embeddings.dim,
                "n_trees": n_trees,
                "ann_trees": ann_trees,
                "seed": seed,
                "search_k": search_k,
                "search_k_tuned": tune_search_k,
                "recall_k": k,
                "ann_recall_at_k": round(recall, 6),
                "search": search,
                "inputs": {"embeddings": embeddings.version},
                "funnel": {
                    **funnel.describe(),
                    "ads_with_clicks": sum(
                        1 for a in ads.ids if (clicks or {}).get(bytes(a).decode(), 0) > 0
                    ),
                    "fresh_ads": len(fresh),
                },
                "counts": {
                    "ads": len(ads),
                    "ann_nodes": ann_size // node_bytes(embeddings.dim, metric),
                    "popular_global": len(popular.global_ads),
                    "popular_placements": len(popular.by_placement),
                },
                "metrics": {
                    "ann_recall_at_k": round(recall, 6),
                    "recall_queries": int(queries.shape[0]),
                    "build_seconds": round(build_seconds, 3),
                    "ann_bytes": ann_size,
                },
            }
        )
    return index_parent / version


def fresh_rows(ad_ids: np.ndarray, trained_ads: Collection[str] | None) -> np.ndarray:
    """Rows (ascending) of the ads not in ``trained_ads``; none when it is None (unknown)."""
    if trained_ads is None:
        return np.empty(0, dtype=np.int64)
    trained = np.array([str(a).encode("utf-8") for a in trained_ads], dtype=bytes)
    return np.flatnonzero(~np.isin(ad_ids, trained)).astype(np.int64)


@dataclass(frozen=True)
class CandidateIndex:
    """A published index opened for serving: the mmapped forest, its id map and popular ads.

    Queries only read the mapped file, so one instance serves concurrent threads (ANNOY's
    ``get_nns_by_vector`` is a const traversal and releases the GIL).
    """

    folder: Path
    manifest: dict[str, Any]
    annoy: AnnoyIndex
    ad_ids: np.ndarray
    popular: PopularAds
    prior: np.ndarray | None = None
    """``log(clicks + smoothing)`` per item (``prior.npy``); None for indexes built without it."""
    columns: np.ndarray | None = None
    """The mapped :data:`COLUMNS_FILE` (``[dim, ads]``); None for indexes built before it."""
    fresh: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Rows of the ads without training rows (:data:`FRESH_FILE`); empty for indexes built
    before it."""

    @property
    def scan_matrix(self) -> np.ndarray | None:
        """``[ads, dim]`` column-major (the columns' transpose, no copy): what the exact scan
        multiplies; None without :data:`COLUMNS_FILE`."""
        return None if self.columns is None else self.columns.T

    @property
    def funnel(self) -> FunnelParams:
        """How serving orders this index's candidates (the manifest's ``funnel`` section)."""
        return FunnelParams.from_manifest(self.manifest)

    @property
    def measured_search(self) -> Literal["exact", "ann"]:
        """The search the build measured faster (manifest ``search.mode``); ``ann`` for an index
        built before the measurement existed."""
        mode = (self.manifest.get("search") or {}).get("mode", "ann")
        return "exact" if mode == "exact" else "ann"

    @property
    def metric(self) -> Metric:
        return self.manifest["metric"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def n_trees(self) -> int:
        return int(self.manifest["n_trees"])

    @property
    def embedding_version(self) -> str:
        return str(self.manifest["embedding_version"])

    def __len__(self) -> int:
        return int(self.ad_ids.shape[0])

    def search(self, query: np.ndarray, n: int, search_k: int = -1) -> list[int]:
        """Rows of about the ``n`` best ads for a dot-product query (see :func:`search_effort`)."""
        effort = search_effort(search_k, self.n_trees, n)
        return self.annoy.get_nns_by_vector(as_query(query, self.metric), n, search_k=effort)

    def item_vector(self, row: int) -> np.ndarray:
        """Item ``row``'s stored vector without the MIPS coordinate (for consistency checks)."""
        return np.asarray(self.annoy.get_item_vector(row)[: self.dim], dtype=np.float32)

    def close(self) -> None:
        """Unmap the file. Only once no thread can still query this index (a retired release)."""
        self.annoy.unload()


_REQUIRED = ("embedding_version", "metric", "dim", "n_trees", "seed", "ann_recall_at_k", "counts")


def _fail(path: Path, rule: str) -> CandidateIndexError:
    return CandidateIndexError(f"{path}: {rule}")


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    where = folder / MANIFEST
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise _fail(where, f"missing {', '.join(missing)} (contracts §5)")
    if manifest["metric"] not in METRICS:
        raise _fail(where, f"metric {manifest['metric']!r} is not one of {METRICS}")
    for key in ("dim", "n_trees"):
        if not isinstance(manifest[key], int) or manifest[key] < 1:
            raise _fail(where, f"{key} must be a positive integer, got {manifest[key]!r}")
    for key in ("ads", "ann_nodes"):
        if not isinstance(manifest["counts"].get(key), int):
            raise _fail(where, f"counts.{key} must be an integer")


def _check_ann_file(path: Path, manifest: dict[str, Any]) -> None:
    """Size checks that must pass before ANNOY maps the file: it trusts every byte."""
    if not path.is_file():
        raise _fail(path, "missing (contracts §5 lists ads.ann)")
    dim, metric = manifest["dim"], manifest["metric"]
    size, node = path.stat().st_size, node_bytes(dim, metric)
    if size % node:
        raise _fail(
            path,
            f"{size} bytes is not a whole number of {node}-byte nodes (dim {dim}, metric "
            f"{metric}): the file is truncated or was built with another dimension or metric",
        )
    nodes = manifest["counts"]["ann_nodes"]
    if size // node != nodes:
        raise _fail(
            path,
            f"holds {size // node} {node}-byte nodes (dim {dim}, metric {metric}) but the manifest "
            f"records {nodes}: the file is truncated, was replaced after publishing, or was built "
            "with another dimension",
        )


def _read_id_map(path: Path, n_ads: int) -> np.ndarray:
    if not path.is_file():
        raise _fail(path, "missing (contracts §5 lists ads_ids.npy)")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise _fail(path, f"not a readable .npy file ({exc})") from None
    if ids.ndim != 1 or ids.dtype.kind != "S":
        raise _fail(path, f"must be 1-D fixed-width bytes (S<n>), got {ids.dtype} {ids.shape}")
    if ids.shape[0] != n_ads:
        raise _fail(
            path,
            f"has {ids.shape[0]} ids but the index has {n_ads} items: item i must be row i "
            "of the id map",
        )
    return ids


def open_index(
    folder: Path, *, verify_checksums: bool = True, prefault: bool = False
) -> CandidateIndex:
    """Open a published index folder for serving, refusing anything inconsistent.

    Checks, cheapest first: manifest fields; ``ads.ann`` size against dim, metric and node count;
    the id map's length; then (``verify_checksums``) every file's SHA-256 via
    ``deepclick.publish.verify``, which catches altered bytes that keep the size; finally the loaded
    forest's item and tree counts. ``prefault=False`` maps lazily; pages are shared by all workers.
    """
    return _open(
        folder, read_manifest(folder), verify_checksums=verify_checksums, prefault=prefault
    )


def open_staged_index(staging: Staging) -> CandidateIndex:
    """A staged (not yet published) index opened as serving will open it, so a build can check
    its candidates before publishing: the manifest as it will be written, checksums included."""
    manifest = {**staging.manifest, "version": staging.version}
    manifest["checksums"] = checksums(staging.path, MANIFEST)
    return _open(staging.path, manifest, verify_checksums=False, prefault=False)


def _open(
    folder: Path, manifest: dict[str, Any], *, verify_checksums: bool, prefault: bool
) -> CandidateIndex:
    _check_manifest(folder, manifest)
    ann_path = folder / ANN_FILE
    _check_ann_file(ann_path, manifest)
    ids = _read_id_map(folder / IDS_FILE, manifest["counts"]["ads"])
    if verify_checksums:
        verify(folder)
    popular = read_popular(folder / POPULAR_FILE)
    metric: Metric = manifest["metric"]
    forest = AnnoyIndex(annoy_dim(manifest["dim"], metric), metric)
    try:
        forest.load(str(ann_path), prefault=prefault)
    except OSError as exc:
        raise _fail(ann_path, f"ANNOY cannot load it ({exc})") from None
    if forest.get_n_items() != ids.shape[0]:
        forest.unload()
        raise _fail(
            ann_path,
            f"holds {forest.get_n_items()} items but {IDS_FILE} has {ids.shape[0]} ids: "
            "item i must be row i of the id map",
        )
    expected_trees = manifest.get("ann_trees", manifest["n_trees"])
    if forest.get_n_trees() != expected_trees:
        forest.unload()
        raise _fail(
            ann_path,
            f"has {forest.get_n_trees()} trees but the manifest says {expected_trees} "
            f"(n_trees={manifest['n_trees']}): built with another dimension or corrupted",
        )
    n_ads = ids.shape[0]
    try:
        columns = _read_columns(folder / COLUMNS_FILE, manifest["dim"], n_ads)
        fresh = _read_fresh(folder / FRESH_FILE, n_ads)
    except CandidateIndexError:
        forest.unload()
        raise
    return CandidateIndex(
        folder, manifest, forest, ids, popular, _read_prior(folder, n_ads), columns, fresh
    )


def _read_prior(folder: Path, n_ads: int) -> np.ndarray | None:
    """``prior.npy`` (one float per item), or None for an index built before it existed."""
    path = folder / PRIOR_FILE
    if not path.is_file():
        return None
    try:
        prior = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise _fail(path, f"not a readable .npy file ({exc})") from None
    if prior.shape != (n_ads,) or prior.dtype.kind != "f" or not np.isfinite(prior).all():
        raise _fail(
            path, f"must hold {n_ads} finite floats (one per item), got {prior.dtype} {prior.shape}"
        )
    return prior


def _read_fresh(path: Path, n_ads: int) -> np.ndarray:
    """:data:`FRESH_FILE`, checked to be distinct ascending rows of the index; empty for an index
    built before it existed."""
    if not path.is_file():
        return np.empty(0, dtype=np.int64)
    try:
        rows = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise _fail(path, f"not a readable .npy file ({exc})") from None
    valid = (
        rows.ndim == 1
        and rows.dtype.kind in "iu"
        and (len(rows) == 0 or (rows[0] >= 0 and rows[-1] < n_ads and (np.diff(rows) > 0).all()))
    )
    if not valid:
        raise _fail(
            path,
            f"must hold distinct ascending rows of the index (0 to {n_ads - 1}), got "
            f"{rows.dtype} {list(rows.shape)}",
        )
    return rows.astype(np.int64)


def _read_columns(path: Path, dim: int, n_ads: int) -> np.ndarray | None:
    """:data:`COLUMNS_FILE` mapped read-only, or None for an index built before it existed."""
    if not path.is_file():
        return None
    try:
        columns = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise _fail(path, f"not a readable .npy file ({exc})") from None
    if columns.shape != (dim, n_ads) or columns.dtype != np.float32:
        raise _fail(
            path,
            f"must hold float32 [{dim}, {n_ads}] (dim x ads: the ad vectors transposed), got "
            f"{columns.dtype} {list(columns.shape)}",
        )
    return columns
