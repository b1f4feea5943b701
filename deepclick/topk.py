"""Exact top-k by dot product: the reference every approximate search is measured against, and
the candidate stage's exact search where it is the faster one (issue 14).

One home for it (issue 13): the index build's recall, the retrieval evaluation and serving all
order the same way — best first, equal scores to the lower row — so their answers agree.
"""

from __future__ import annotations

import numpy as np

QUERY_CHUNK = 1024
"""Queries scored at once: bounds the ``[chunk, items]`` score matrix."""


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` largest ``scores``, best first, equal scores to the lower row."""
    size = scores.shape[0]
    n = min(int(n), size)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    top = np.argpartition(scores, size - n)[size - n :] if n < size else np.arange(n)
    return top[np.lexsort((top, -scores[top]))].astype(np.int64)


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` items with the largest ``query·item``, best first, per query.

    Equal scores are ordered by the lower row, so the answer is deterministic.
    """
    queries = np.asarray(queries, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    k = min(int(k), items.shape[0])
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        scores = queries[start : start + QUERY_CHUNK] @ items.T
        if k < items.shape[0]:
            rows = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
        else:
            rows = np.broadcast_to(np.arange(k), scores.shape)
        best = np.take_along_axis(scores, rows, axis=1)
        order = np.argsort(-best, axis=1, kind="stable")
        out[start : start + QUERY_CHUNK] = np.take_along_axis(rows, order, axis=1)
    return out
