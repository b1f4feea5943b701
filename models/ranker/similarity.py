"""Two-tower scores from a published embeddings version, as ranker inputs.

The ranker may take the retrieval stage's own scores (user·ad and context·ad, docs/contracts.md §4:
``metric = dot``) as two numeric inputs: they summarise the user × ad affinity the two-tower learned
from clicks, which an ID-embedding ranker would otherwise have to re-learn. This module backs the
:class:`~models.ranker.inputs.SimilarityProvider` protocol with the memory-mapped tables of
``candidates.store``; it relies only on their shape (``ids``, ``vectors``, fallbacks, ``version``),
so ``models`` does not import ``candidates``.

Unknown users and placements get the table's fallback vector (what serving uses for cold start);
an unknown ad gets a zero vector, i.e. both scores 0 (there is no ad fallback in the contract).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from deepclick.sorted_ids import sorted_rows

CHUNK = 65_536
"""Rows scored at once, bounding the memory of gathered vectors on large training sets."""


class _Table(Protocol):
    ids: np.ndarray
    vectors: np.ndarray


def lookup_rows(table: _Table, ids: np.ndarray) -> np.ndarray:
    """Row of each id in a sorted fixed-width id table, or -1 when absent (the one rule of
    ``deepclick.sorted_ids``)."""
    encoded = np.char.encode(np.asarray(ids, dtype=str), "utf-8")
    return sorted_rows(table.ids, encoded)


def _gather(table: _Table, ids: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    rows = lookup_rows(table, ids)
    out = np.asarray(table.vectors[np.maximum(rows, 0)], dtype=np.float32)
    out[rows < 0] = fallback
    return out


class EmbeddingSimilarity:
    """:class:`~models.ranker.inputs.SimilarityProvider` over ``candidates.store.Embeddings``.

    Args:
        embeddings: an opened embeddings version (``candidates.store.read_embeddings``).
    """

    def __init__(self, embeddings: Any) -> None:
        self._embeddings = embeddings
        self._no_ad = np.zeros(int(embeddings.dim), dtype=np.float32)

    @property
    def version(self) -> str:
        return str(self._embeddings.version)

    def scores(
        self, user_ids: np.ndarray, placement_ids: np.ndarray, ad_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        e = self._embeddings
        n = len(ad_ids)
        user_ad = np.empty(n, dtype=np.float32)
        context_ad = np.empty(n, dtype=np.float32)
        for start in range(0, n, CHUNK):
            part = slice(start, start + CHUNK)
            ads = _gather(e.ads, np.asarray(ad_ids[part]), self._no_ad)
            users = _gather(e.users, np.asarray(user_ids[part]), e.fallback_user)
            places = _gather(e.placements, np.asarray(placement_ids[part]), e.fallback_placement)
            user_ad[part] = np.einsum("ij,ij->i", users, ads)
            context_ad[part] = np.einsum("ij,ij->i", places, ads)
        return user_ad, context_ad
