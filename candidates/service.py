"""CandidateService: a few hundred plausible ads for one (user, placement) request.

The serving step between entity lookup and ranking (DESIGN.md). The query vector is
``user_vector + placement_vector`` (additive two-tower: score = user·ad + context·ad), so a known
user or placement costs a binary search in an mmapped table and no tower runs online. Vectors come,
strongest first, from the request (cold start computed elsewhere from features), the embeddings
table, or the documented fallback vector of the embeddings folder (``fallback_user.npy`` /
``fallback_placement.npy``); the result says which applied.

Candidates, without duplicates and without the ads the caller excludes, come in four parts
(``candidates.funnel`` says why): most by ``query·ad + prior_weight · log(clicks + smoothing)``
over the ANNOY neighbours and the most clicked ads (the index's prior and weight); a share
``fresh_share`` from the ads without training rows (the index's fresh rows), best ``query·ad``
among them (the way in for new ads); a share ``explore_share`` by similarity alone; and a quota of
ads popular on the placement (its own list, else the overall list). An index without a prior
(weight 0) gives the neighbours plus the popular quota, as before.

The neighbours come from an exact scan of the mapped ad vectors (recall 1.0) or from ANNOY,
whichever the index build measured faster for this catalogue and dimension (issue 14). The whole
selection works on integer rows with numpy arrays — no object per candidate — and the result
carries the rows, ids, scores and the two halves of each score, so feature assembly reuses them
instead of decoding, searching and scoring the ads again.

Thread safety: a service never changes after loading. ANNOY's ``get_nns_by_vector`` is a read-only
traversal of the mmapped forest that releases the GIL, and the numpy tables are read-only maps, so
one instance serves any number of concurrent threads; each worker process maps the same files and
the page cache holds one copy for all of them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from deepclick.errors import DeepclickError
from deepclick.publish import read_manifest, resolve
from deepclick.topk import top_rows

from .index import COLUMNS_FILE, CandidateIndex, exact_search, open_index
from .store import Embeddings, EmbeddingTable, ids_file, read_embeddings

VectorSource = Literal["request", "table", "fallback"]
PRIOR_POOL_CAP = 10_000
"""At most this many most clicked ads join a request's prior-ordered pool (k of them do)."""
CandidateSource = Literal["ann", "popular"]
SearchMode = Literal["auto", "exact", "ann"]
"""How the neighbours are found: ``exact`` (a BLAS scan of the mapped ad vectors, recall 1.0),
``ann`` (ANNOY), or ``auto``: what the index build measured faster for its catalogue and dimension
(the manifest's ``search.mode``; ``ann`` for an index built before the measurement existed)."""


class PairingError(DeepclickError, ValueError):
    """An index and an embeddings folder that were not built together."""


@dataclass(frozen=True)
class Candidate:
    ad_id: str
    score: float
    """``query·ad``, the two-tower similarity, whatever the source."""
    source: CandidateSource


@dataclass(frozen=True, eq=False)
class QueryParts:
    """The query's two halves and where they came from, found once per request: the candidate
    stage sums them, feature assembly reuses the rows and the per-ad similarities."""

    user: np.ndarray
    placement: np.ndarray
    user_source: VectorSource
    placement_source: VectorSource
    user_row: int | None
    """Row in the users embedding table (None: request or fallback vector)."""
    placement_row: int | None

    @property
    def query(self) -> np.ndarray:
        return (self.user + self.placement).astype(np.float32)

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Entities ("user", "placement") whose fallback vector applies."""
        sources = (("user", self.user_source), ("placement", self.placement_source))
        return tuple(name for name, source in sources if source == "fallback")


@dataclass(frozen=True, eq=False)
class CandidateResult:
    """Candidates, best similarity first, as parallel arrays (no per-candidate objects), and
    where the query vector's parts came from.

    ``rows`` are rows of the index, which are rows of the ads embedding table (pairing rule);
    ``keys`` the ads' ids as fixed-width UTF-8 bytes; ``user_ad`` / ``context_ad`` the two halves
    of ``scores`` (``user·ad``, ``placement·ad``) that the ranker may take as inputs.
    """

    keys: np.ndarray
    scores: np.ndarray
    popular: np.ndarray
    """True where the candidate came from the popular side (quota or prior pool), not ANN."""
    user_vector_source: VectorSource
    placement_vector_source: VectorSource
    index_version: str = ""
    fallbacks: tuple[str, ...] = field(default=())
    """Entities ("user", "placement") whose fallback vector was used."""
    rows: np.ndarray | None = None
    user_ad: np.ndarray | None = None
    context_ad: np.ndarray | None = None
    parts: QueryParts | None = None

    @classmethod
    def from_ids(
        cls,
        ad_ids: Sequence[str],
        scores: Sequence[float],
        source: CandidateSource,
        *,
        user_vector_source: VectorSource = "table",
        placement_vector_source: VectorSource = "table",
    ) -> CandidateResult:
        """A result for a given list of ids (a swapped-in candidate stage; no index rows)."""
        return cls(
            keys=np.array([a.encode("utf-8") for a in ad_ids], dtype="S")
            if ad_ids
            else np.empty(0, dtype="S1"),
            scores=np.asarray(scores, dtype=np.float32),
            popular=np.full(len(ad_ids), source == "popular"),
            user_vector_source=user_vector_source,
            placement_vector_source=placement_vector_source,
        )

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __eq__(self, other: object) -> bool:
        """Equal answers: the same candidates in the same order, from the same sources."""
        if not isinstance(other, CandidateResult):
            return NotImplemented
        return (
            self.candidates == other.candidates
            and (self.user_vector_source, self.placement_vector_source, self.fallbacks)
            == (other.user_vector_source, other.placement_vector_source, other.fallbacks)
            and self.index_version == other.index_version
        )

    __hash__ = None  # type: ignore[assignment]

    def ad_id(self, i: int) -> str:
        return bytes(self.keys[i]).decode("utf-8")

    def source(self, i: int) -> CandidateSource:
        return "popular" if self.popular[i] else "ann"

    @property
    def ad_ids(self) -> list[str]:
        return [bytes(k).decode("utf-8") for k in self.keys]

    @property
    def candidates(self) -> list[Candidate]:
        """The result as objects (for callers outside the request path)."""
        return [
            Candidate(self.ad_id(i), float(self.scores[i]), self.source(i))
            for i in range(len(self))
        ]


def paired_embeddings_folder(index_folder: Path, embeddings_parent: Path) -> Path:
    """The embeddings folder an index was built from (its manifest's ``embedding_version``)."""
    version = read_manifest(index_folder).get("embedding_version")
    return resolve(embeddings_parent, version, what="embeddings")


def check_pairing(index: CandidateIndex, embeddings: Embeddings, *, spot_checks: int = 16) -> None:
    """Refuse an index and embeddings that were not built together.

    Rules: same embeddings version, same dim, identical ads id map (compared by the two manifests'
    checksums), and a few items' stored vectors equal to the ads table's rows — which also catches
    an ``ads.ann`` built with another dimension.
    """
    where = f"index {index.folder} and embeddings {embeddings.folder}"
    if index.embedding_version != embeddings.version:
        raise PairingError(
            f"{where} are not paired: the index was built from embeddings version "
            f"{index.embedding_version!r}, the folder holds {embeddings.version!r}"
        )
    if index.dim != embeddings.dim:
        raise PairingError(
            f"{where}: dimension mismatch, index dim {index.dim} vs embeddings dim {embeddings.dim}"
        )
    ids = ids_file("ads")
    ours = index.manifest.get("checksums", {}).get(ids)
    theirs = embeddings.manifest.get("checksums", {}).get(ids)
    if ours is None or ours != theirs or len(index) != len(embeddings.ads):
        raise PairingError(f"{where}: {ids} differs, so item i would not be the same ad")
    rows = np.unique(np.linspace(0, len(index) - 1, num=min(spot_checks, len(index)), dtype=int))
    for row in rows:
        if not np.allclose(index.item_vector(int(row)), embeddings.ads.vectors[row], atol=1e-6):
            raise PairingError(
                f"{where}: ads.ann item {row} differs from row {row} of ads_vectors.npy "
                "(built from other vectors or another dimension)"
            )
        if index.columns is not None and not np.array_equal(
            index.columns[:, row], embeddings.ads.vectors[row]
        ):
            raise PairingError(
                f"{where}: column {row} of {COLUMNS_FILE} differs from row {row} of "
                "ads_vectors.npy (built from other vectors)"
            )


class CandidateService:
    """Candidate selection over one published (index, embeddings) pair; immutable, thread-safe."""

    def __init__(
        self,
        index: CandidateIndex,
        embeddings: Embeddings,
        *,
        popular_quota: float = 0.1,
        search_k: int | None = None,
        search: SearchMode = "auto",
    ) -> None:
        """``popular_quota`` is the share of ``k`` reserved for popular ads; ``search_k``
        defaults to the value the index's recall was measured with (with ``auto`` choosing
        ANNOY: the effort the build timed against the exact scan); ``search`` picks exact or
        ANN neighbours (:data:`SearchMode`)."""
        if not 0.0 <= popular_quota <= 1.0:
            raise ValueError(f"popular_quota must be within [0, 1], got {popular_quota}")
        if search not in ("auto", "exact", "ann"):
            raise ValueError(f"search must be auto, exact or ann, got {search!r}")
        check_pairing(index, embeddings)
        self.index = index
        self.embeddings = embeddings
        self.popular_quota = popular_quota
        self.search_mode: Literal["exact", "ann"] = (
            index.measured_search if search == "auto" else search
        )
        measured = index.manifest.get("search") or {}
        if search_k is None and search == "auto" and self.search_mode == "ann":
            # ANNOY at the effort the build timed it at and measured its recall@n with
            search_k = measured.get("search_k")
        self.search_k = int(index.manifest.get("search_k", -1) if search_k is None else search_k)
        self.funnel = index.funnel
        # Plain ndarray views of the mapped files (no copy): indexing a np.memmap builds a
        # memmap object per call, measurable at a few calls per request.
        self._vectors = np.asarray(embeddings.ads.vectors)
        self._ad_ids = np.asarray(index.ad_ids)
        self._entity_vectors = {
            table.name: np.asarray(table.vectors)
            for table in (embeddings.users, embeddings.placements)
        }
        # The exact scan multiplies the index's column-major copy when it has one (3x cheaper,
        # candidates.index.COLUMNS_FILE); the same numbers as the rows up to float rounding.
        scan = index.scan_matrix
        self._scan = self._vectors if scan is None else np.asarray(scan)
        self._prior = index.prior if index.prior is not None and self.funnel.prior_weight else None
        self._fresh = index.fresh if self.funnel.fresh_share > 0 else index.fresh[:0]
        # The most clicked rows, the popular half of the prior-ordered pool (capped: a request
        # never needs more than its k of them).
        self._prior_top = (
            np.argsort(-self._prior, kind="stable")[:PRIOR_POOL_CAP].astype(np.int64)
            if self._prior is not None
            else np.empty(0, dtype=np.int64)
        )
        # Popular ads resolved to rows once, each placement's list continued by the overall one
        # without repeats: a few hundred rows per placement, not the whole catalogue.
        ads = embeddings.ads
        overall = ads.rows(index.popular.global_ads)
        self._popular_global = _first_occurrences(overall[overall >= 0])
        self._popular_by_placement = {}
        for placement, ad_ids in index.popular.by_placement.items():
            own = ads.rows(ad_ids)
            self._popular_by_placement[placement] = _first_occurrences(
                np.concatenate([own[own >= 0], self._popular_global])
            )

    @classmethod
    def load(
        cls,
        index_folder: Path,
        embeddings_folder: Path,
        *,
        popular_quota: float = 0.1,
        search_k: int | None = None,
        search: SearchMode = "auto",
        verify_checksums: bool = True,
        prefault: bool = False,
    ) -> CandidateService:
        """Open and verify both published folders and check that they belong together."""
        embeddings = read_embeddings(embeddings_folder, verify_checksums=verify_checksums)
        index = open_index(index_folder, verify_checksums=verify_checksums, prefault=prefault)
        try:
            return cls(
                index, embeddings, popular_quota=popular_quota, search_k=search_k, search=search
            )
        except Exception:
            index.close()
            raise

    def locate(
        self,
        user_id: str | None,
        placement_id: str | None,
        *,
        user_vector: np.ndarray | None = None,
        placement_vector: np.ndarray | None = None,
    ) -> QueryParts:
        """The query's parts, strongest source first: request > table > fallback (one binary
        search per entity; the caller may hand the result to :meth:`candidates`)."""
        emb = self.embeddings
        user, user_src, user_row = self._part(user_vector, emb.users, user_id, emb.fallback_user)
        placement, placement_src, placement_row = self._part(
            placement_vector, emb.placements, placement_id, emb.fallback_placement
        )
        return QueryParts(user, placement, user_src, placement_src, user_row, placement_row)

    def query_vector(
        self,
        user_id: str | None,
        placement_id: str | None,
        *,
        user_vector: np.ndarray | None = None,
        placement_vector: np.ndarray | None = None,
    ) -> tuple[np.ndarray, VectorSource, VectorSource]:
        """``user + placement`` vector and the source of each part (request > table > fallback)."""
        parts = self.locate(
            user_id, placement_id, user_vector=user_vector, placement_vector=placement_vector
        )
        return parts.query, parts.user_source, parts.placement_source

    def _part(
        self,
        given: np.ndarray | None,
        table: EmbeddingTable,
        entity_id: str | None,
        fallback: np.ndarray,
    ) -> tuple[np.ndarray, VectorSource, int | None]:
        if given is not None:
            vector = np.asarray(given, dtype=np.float32)
            if vector.shape != (self.embeddings.dim,):
                raise ValueError(
                    f"{table.name} vector from the request must have shape "
                    f"({self.embeddings.dim},), got {vector.shape}"
                )
            return vector, "request", None
        row = table.row(entity_id) if entity_id is not None else None
        if row is None:
            return fallback, "fallback", None
        return self._entity_vectors[table.name][row], "table", row

    def neighbours(self, query: np.ndarray, n: int) -> np.ndarray:
        """Rows of about the ``n`` best ``query·ad``, best first: exact (every ad scored with one
        BLAS matrix-vector product over the mapped vectors) or ANNOY, per :attr:`search_mode`."""
        if self.search_mode == "exact":
            return exact_search(self._scan, query, n)
        return np.asarray(self.index.search(query, n, self.search_k), dtype=np.int64)

    def candidates(
        self,
        user_id: str | None,
        placement_id: str | None,
        k: int,
        exclude: Collection[str] = (),
        user_vector: np.ndarray | None = None,
        placement_vector: np.ndarray | None = None,
        *,
        parts: QueryParts | None = None,
    ) -> CandidateResult:
        """Up to ``k`` distinct ads (exactly ``k`` when the catalogue minus ``exclude`` has that
        many): ``k * popular_quota`` (rounded half up) popular ads for the placement that ANN did
        not already find, ``k * fresh_share`` fresh ads (as many as there are), the rest by the
        prior and nearest neighbours; gaps in either are filled from the other. Best ``query·ad``
        first. ``parts`` (from :meth:`locate`) skips the entity lookup."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if parts is None:
            parts = self.locate(
                user_id, placement_id, user_vector=user_vector, placement_vector=placement_vector
            )
        query = parts.query
        n_items = len(self.index)
        popular = self._popular_by_placement.get(placement_id, self._popular_global)
        quota = min(k, int(k * self.popular_quota + 0.5))  # half up, unlike round()
        explore = min(k - quota, int(k * self.funnel.explore_share + 0.5))
        exact = self.search_mode == "exact" and k > 0
        scores = _Scores(self._vectors, query, scan=self._scan if exact else None)

        def search(n: int) -> np.ndarray:
            """The ``n`` best rows: from the exact scan's scores, else ANNOY."""
            if scores.scan is not None:
                return top_rows(scores.scan, n)
            return self.neighbours(query, n)

        want = min(n_items, k + len(set(exclude)))
        found = search(want) if k else np.empty(0, dtype=np.int64)
        picked = _Picked(n_items, self._banned_rows(exclude))
        fresh = self._best_fresh(scores, k, k - quota - explore, picked)
        if self._prior is not None:
            self._take_by_prior(scores, found, k, k - quota - explore - len(fresh), picked)
        picked.take(fresh, len(picked) + len(fresh), popular=False)

        def fill_ann(limit: int) -> None:
            """Take neighbours up to ``limit``; ANNOY may return fewer than asked (search_k,
            exclusions), so widen the search until the limit is met or every ad was seen."""
            nonlocal found, want
            picked.take(found, limit, popular=False)
            while len(picked) < limit and want < n_items:
                want = min(n_items, want * 2)
                found = search(want)
                picked.take(found, limit, popular=False)

        fill_ann(k - quota)
        picked.take(popular, k, popular=True)
        fill_ann(k)

        rows, from_popular = picked.arrays()
        chosen = scores.of(rows)
        order = np.argsort(-chosen, kind="stable")
        rows = rows[order]
        vectors = np.asarray(self._vectors[rows], dtype=np.float32)
        return CandidateResult(
            keys=self._ad_ids[rows],
            scores=chosen[order],
            popular=from_popular[order],
            user_vector_source=parts.user_source,
            placement_vector_source=parts.placement_source,
            index_version=str(self.index.manifest.get("version", "")),
            fallbacks=parts.fallbacks,
            rows=rows,
            user_ad=vectors @ np.asarray(parts.user, dtype=np.float32),
            context_ad=vectors @ np.asarray(parts.placement, dtype=np.float32),
            parts=parts,
        )

    def _banned_rows(self, exclude: Collection[str]) -> np.ndarray:
        """Rows of the excluded ids that the catalogue holds (unknown ids exclude nothing)."""
        if not exclude:
            return np.empty(0, dtype=np.int64)
        rows = self.embeddings.ads.rows(list(exclude))
        return rows[rows >= 0]

    def _best_fresh(self, scores: _Scores, k: int, room: int, picked: _Picked) -> np.ndarray:
        """The fresh slots' rows: up to ``k * fresh_share`` (rounded half up, at most ``room``)
        of the fresh ads not excluded, best ``query·ad`` first (exact: the fresh ads are the
        few the last days added)."""
        if not len(self._fresh) or room <= 0:
            return self._fresh[:0]
        pool = self._fresh[~picked.closed[self._fresh]]
        n = min(room, int(k * self.funnel.fresh_share + 0.5), len(pool))
        return pool[top_rows(scores.of(pool), n)] if n > 0 else pool[:0]

    def _take_by_prior(
        self, scores: _Scores, neighbours: np.ndarray, k: int, limit: int, picked: _Picked
    ) -> None:
        """Add up to ``limit`` rows with the best ``query·ad + weight · prior`` from the pool of
        the neighbours and the ``k`` most clicked ads (exact over the pool: the prior moves ads
        that ANNOY, searching by similarity, would not return)."""
        if limit <= 0:
            return
        found = np.zeros(len(self.index), dtype=bool)
        found[neighbours] = True
        top = self._prior_top[:k]
        # The union, sorted as np.unique would give it, from the mask the sources need anyway:
        # np.unique's hashing cost 0.05 ms a request at 100k ads, a tenth of the whole stage.
        pool = np.sort(np.concatenate([neighbours, top[~found[top]]]))
        ranked = scores.of(pool) + self.funnel.prior_weight * self._prior[pool]
        ordered = pool[np.argsort(-ranked, kind="stable")]
        picked.take(ordered, limit, popular=~found[ordered])

    def index_id(self, row: int) -> str:
        return bytes(self.index.ad_ids[row]).decode("utf-8")


class _Scores:
    """``query·ad`` of any rows for one request. With ``scan`` (exact search) every ad is scored
    once by one BLAS pass and the funnel's later steps read those scores instead of scoring the
    same rows again (issue 14); otherwise (ANNOY) the rows asked for are scored when asked."""

    def __init__(self, vectors: np.ndarray, query: np.ndarray, *, scan: np.ndarray | None) -> None:
        """``scan``: the matrix to score every ad with (its rows = ``vectors``' rows), or None."""
        self.vectors = vectors
        self.query = query
        self.scan: np.ndarray | None = None if scan is None else np.asarray(scan) @ query

    def of(self, rows: np.ndarray) -> np.ndarray:
        if self.scan is not None:
            return self.scan[rows]
        return np.asarray(self.vectors[rows], dtype=np.float32) @ self.query


class _Picked:
    """The rows chosen so far, in order, with their source: one mask over the catalogue marks
    the rows taken or banned, so each step costs its own rows, not a search of the earlier ones."""

    def __init__(self, n_items: int, banned: np.ndarray) -> None:
        self.closed = np.zeros(n_items, dtype=bool)
        self.closed[banned] = True
        self.rows: list[np.ndarray] = []
        self.popular: list[np.ndarray] = []
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def take(self, rows: np.ndarray, limit: int, *, popular: bool | np.ndarray) -> None:
        """Append the first rows of ``rows`` not yet taken nor banned until ``limit`` are held
        (``rows`` hold no repeats)."""
        room = limit - self.count
        if room <= 0 or not len(rows):
            return
        chosen = np.flatnonzero(~self.closed[rows])[:room]
        taken = rows[chosen]
        self.closed[taken] = True
        self.rows.append(taken)
        source = np.broadcast_to(np.asarray(popular), rows.shape)
        self.popular.append(source[chosen])
        self.count += len(chosen)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.rows:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=bool)
        return np.concatenate(self.rows).astype(np.int64), np.concatenate(self.popular)


def _first_occurrences(rows: np.ndarray) -> np.ndarray:
    """``rows`` without repeats, first occurrence kept, order kept."""
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)].astype(np.int64)
