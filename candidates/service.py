"""CandidateService: a few hundred plausible ads for one (user, placement) request.

The serving step between entity lookup and ranking (DESIGN.md). The query vector is
``user_vector + placement_vector`` (additive two-tower: score = user·ad + context·ad), so a known
user or placement costs a binary search in an mmapped table and no tower runs online. Vectors come,
strongest first, from the request (cold start computed elsewhere from features), the embeddings
table, or the documented fallback vector of the embeddings folder (``fallback_user.npy`` /
``fallback_placement.npy``); the result says which applied.

Candidates, without duplicates and without the ads the caller excludes, come in three parts
(``candidates.funnel`` says why): most by ``query·ad + prior_weight · log(clicks + smoothing)``
over the ANNOY neighbours and the most clicked ads (the index's prior and weight); a share
``explore_share`` by similarity alone (cold-start ads get in there); and a quota of ads popular on
the placement (its own list, else the overall list). An index without a prior (weight 0) gives
the neighbours plus the popular quota, as before.

Thread safety: a service never changes after loading. ANNOY's ``get_nns_by_vector`` is a read-only
traversal of the mmapped forest that releases the GIL, and the numpy tables are read-only maps, so
one instance serves any number of concurrent threads; each worker process maps the same files and
the page cache holds one copy for all of them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from deepclick.errors import DeepclickError
from deepclick.publish import read_manifest, resolve

from .index import CandidateIndex, open_index
from .store import Embeddings, EmbeddingTable, ids_file, read_embeddings

VectorSource = Literal["request", "table", "fallback"]
PRIOR_POOL_CAP = 10_000
"""At most this many most clicked ads join a request's prior-ordered pool (k of them do)."""
CandidateSource = Literal["ann", "popular"]


class PairingError(DeepclickError, ValueError):
    """An index and an embeddings folder that were not built together."""


@dataclass(frozen=True)
class Candidate:
    ad_id: str
    score: float
    """``query·ad``, the two-tower similarity, whatever the source."""
    source: CandidateSource


@dataclass(frozen=True)
class CandidateResult:
    """Candidates, best similarity first, and where the query vector's parts came from."""

    candidates: list[Candidate]
    user_vector_source: VectorSource
    placement_vector_source: VectorSource
    index_version: str = ""
    fallbacks: tuple[str, ...] = field(default=())
    """Entities ("user", "placement") whose fallback vector was used."""

    @property
    def ad_ids(self) -> list[str]:
        return [c.ad_id for c in self.candidates]


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


class CandidateService:
    """Candidate selection over one published (index, embeddings) pair; immutable, thread-safe."""

    def __init__(
        self,
        index: CandidateIndex,
        embeddings: Embeddings,
        *,
        popular_quota: float = 0.1,
        search_k: int | None = None,
    ) -> None:
        """``popular_quota`` is the share of ``k`` reserved for popular ads; ``search_k``
        defaults to the value the index's recall was measured with."""
        if not 0.0 <= popular_quota <= 1.0:
            raise ValueError(f"popular_quota must be within [0, 1], got {popular_quota}")
        check_pairing(index, embeddings)
        self.index = index
        self.embeddings = embeddings
        self.popular_quota = popular_quota
        self.search_k = int(index.manifest.get("search_k", -1) if search_k is None else search_k)
        self.funnel = index.funnel
        self._prior = index.prior if index.prior is not None and self.funnel.prior_weight else None
        # The most clicked rows, the popular half of the prior-ordered pool (capped: a request
        # never needs more than its k of them).
        self._prior_top = (
            np.argsort(-self._prior, kind="stable")[:PRIOR_POOL_CAP].astype(np.int64)
            if self._prior is not None
            else np.empty(0, dtype=np.int64)
        )
        # Popular ads resolved to rows once: a few hundred per placement, not the whole catalogue.
        ads = embeddings.ads
        self._popular_global = _with_rows(index.popular.global_ads, ads)
        self._popular_by_placement = {
            p: _with_rows(ad_ids, ads) for p, ad_ids in index.popular.by_placement.items()
        }

    @classmethod
    def load(
        cls,
        index_folder: Path,
        embeddings_folder: Path,
        *,
        popular_quota: float = 0.1,
        search_k: int | None = None,
        verify_checksums: bool = True,
        prefault: bool = False,
    ) -> CandidateService:
        """Open and verify both published folders and check that they belong together."""
        embeddings = read_embeddings(embeddings_folder, verify_checksums=verify_checksums)
        index = open_index(index_folder, verify_checksums=verify_checksums, prefault=prefault)
        try:
            return cls(index, embeddings, popular_quota=popular_quota, search_k=search_k)
        except Exception:
            index.close()
            raise

    def query_vector(
        self,
        user_id: str | None,
        placement_id: str | None,
        *,
        user_vector: np.ndarray | None = None,
        placement_vector: np.ndarray | None = None,
    ) -> tuple[np.ndarray, VectorSource, VectorSource]:
        """``user + placement`` vector and the source of each part (request > table > fallback)."""
        emb = self.embeddings
        user, user_src = self._part(user_vector, emb.users, user_id, emb.fallback_user)
        placement, placement_src = self._part(
            placement_vector, emb.placements, placement_id, emb.fallback_placement
        )
        return (user + placement).astype(np.float32), user_src, placement_src

    def _part(
        self,
        given: np.ndarray | None,
        table: EmbeddingTable,
        entity_id: str | None,
        fallback: np.ndarray,
    ) -> tuple[np.ndarray, VectorSource]:
        if given is not None:
            vector = np.asarray(given, dtype=np.float32)
            if vector.shape != (self.embeddings.dim,):
                raise ValueError(
                    f"{table.name} vector from the request must have shape "
                    f"({self.embeddings.dim},), got {vector.shape}"
                )
            return vector, "request"
        row = table.row(entity_id) if entity_id is not None else None
        if row is None:
            return fallback, "fallback"
        return np.asarray(table.vectors[row]), "table"

    def candidates(
        self,
        user_id: str | None,
        placement_id: str | None,
        k: int,
        exclude: Collection[str] = (),
        user_vector: np.ndarray | None = None,
        placement_vector: np.ndarray | None = None,
    ) -> CandidateResult:
        """Up to ``k`` distinct ads (exactly ``k`` when the catalogue minus ``exclude`` has that
        many): ``k * popular_quota`` (rounded half up) popular ads for the placement that ANN did
        not already find, the rest nearest neighbours; gaps in either are filled from the other.
        Best ``query·ad`` first."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        query, user_src, placement_src = self.query_vector(
            user_id, placement_id, user_vector=user_vector, placement_vector=placement_vector
        )
        banned = set(exclude)
        picked: dict[int, CandidateSource] = {}  # row -> source, insertion-ordered
        n_items = len(self.index)
        own = self._popular_by_placement.get(placement_id, ()) if placement_id else ()
        popular = own + self._popular_global  # the placement's list, continued by the overall one
        quota = min(k, int(k * self.popular_quota + 0.5))  # half up, unlike round()
        explore = min(k - quota, int(k * self.funnel.explore_share + 0.5))

        def take_ann(rows: list[int], limit: int) -> None:
            for row in rows:
                if len(picked) >= limit:
                    return
                if row not in picked and not (banned and self.index_id(row) in banned):
                    picked[row] = "ann"

        def take_popular(limit: int) -> None:
            for ad, row in popular:
                if len(picked) >= limit:
                    return
                if row not in picked and ad not in banned:
                    picked[row] = "popular"

        want = min(n_items, k + len(banned))
        rows = self.index.search(query, want, self.search_k) if k else []

        def fill_ann(limit: int) -> None:
            """Take neighbours up to ``limit``; ANNOY may return fewer than asked (search_k,
            exclusions), so widen the search until the limit is met or every ad was seen."""
            nonlocal rows, want
            take_ann(rows, limit)
            while len(picked) < limit and want < n_items:
                want = min(n_items, want * 2)
                rows = self.index.search(query, want, self.search_k)
                take_ann(rows, limit)

        if self._prior is not None:
            self._take_by_prior(query, rows, k, k - quota - explore, banned, picked)
        fill_ann(k - quota)
        take_popular(k)
        fill_ann(k)

        chosen = np.fromiter(picked, dtype=np.int64, count=len(picked))
        scores = (np.asarray(self.embeddings.ads.vectors[chosen]) @ query).tolist()
        result = sorted(
            (
                Candidate(self.index_id(row), score, source)
                for (row, source), score in zip(picked.items(), scores, strict=True)
            ),
            key=lambda c: -c.score,
        )
        return CandidateResult(
            candidates=result,
            user_vector_source=user_src,
            placement_vector_source=placement_src,
            index_version=str(self.index.manifest.get("version", "")),
            fallbacks=tuple(
                name
                for name, src in (("user", user_src), ("placement", placement_src))
                if src == "fallback"
            ),
        )

    def _take_by_prior(
        self,
        query: np.ndarray,
        neighbours: list[int],
        k: int,
        limit: int,
        banned: set[str],
        picked: dict[int, CandidateSource],
    ) -> None:
        """Add up to ``limit`` rows with the best ``query·ad + weight · prior`` from the pool of
        the neighbours and the ``k`` most clicked ads (exact over the pool: the prior moves ads
        that ANNOY, searching by similarity, would not return)."""
        if limit <= 0:
            return
        popular = self._prior_top[:k]
        pool = np.unique(np.concatenate([np.asarray(neighbours, dtype=np.int64), popular]))
        scores = np.asarray(self.embeddings.ads.vectors[pool]) @ query
        scores = scores + self.funnel.prior_weight * self._prior[pool]
        from_ann = set(neighbours)
        for i in np.argsort(-scores, kind="stable"):
            if len(picked) >= limit:
                return
            row = int(pool[i])
            if row not in picked and not (banned and self.index_id(row) in banned):
                picked[row] = "ann" if row in from_ann else "popular"

    def index_id(self, row: int) -> str:
        return bytes(self.index.ad_ids[row]).decode("utf-8")


def _with_rows(ad_ids: tuple[str, ...], ads: EmbeddingTable) -> tuple[tuple[str, int], ...]:
    """Popular ids paired with their rows; ids missing from the catalogue are dropped."""
    return tuple((ad, row) for ad in ad_ids if (row := ads.row(ad)) is not None)
