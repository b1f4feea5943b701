"""Exact top-k by dot product and the recall of an approximate search against it.

Exact top-k is the reference every approximate search is measured against, and the candidate
stage's exact search where it is the faster one (issue 14). :func:`ann_recall` is that
measurement. One home for both (issue 13): the index build's recorded ``ann_recall_at_k``, the
retrieval evaluation's ``measured_vs_exact``, serving and the benchmarks all order the same way —
best first, equal scores to the lower row — and count a hit the same way, so their numbers agree.
(Recall@K of *clicked* ads, a different question, is ``models.evaluation.retrieval.recall_at_k``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

QUERY_CHUNK = 1024
"""Queries scored at once: bounds the ``[chunk, items]`` score matrix."""


SAMPLE_STEP = 16
"""``top_rows`` on a large array first finds a threshold on every 16th score."""


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` largest ``scores``, best first, equal scores to the lower row.

    On a large array (the candidate stage's exact scan: 100k scores, 500 wanted) a threshold
    from a strided sample keeps only the rows at or above it — a little more than ``n`` — and
    only those are ordered: 0.25 vs 0.44 ms per 100k-score query, same rows (issue 14). Exact
    whatever the sample: when fewer than ``n`` rows pass, the whole array is partitioned.
    """
    size = scores.shape[0]
    n = min(int(n), size)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if 4 * SAMPLE_STEP * n <= size:
        sample = scores[::SAMPLE_STEP]
        k = min(len(sample), 2 * (n // SAMPLE_STEP) + 8)  # ~2n rows expected to pass
        threshold = np.partition(sample, len(sample) - k)[len(sample) - k]
        passed = np.flatnonzero(scores >= threshold)
        if len(passed) >= n:  # every row of the top n is among them, ties included
            return passed[np.lexsort((passed, -scores[passed]))[:n]].astype(np.int64)
    if n < size:
        # every row tied with the n-th score is a candidate, so ties go to the lower row
        kth = np.partition(scores, size - n)[size - n]
        top = np.flatnonzero(scores >= kth)
    else:
        top = np.arange(n)
    return top[np.lexsort((top, -scores[top]))][:n].astype(np.int64)


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` items with the largest ``query·item``, best first, per query.

    Equal scores are ordered by the lower row, so the answer is deterministic.
    """
    queries = np.asarray(queries, dtype=np.float32)
    items = np.asarray(items, dtype=np.float32)
    k = min(int(k), items.shape[0])
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        out[start : start + QUERY_CHUNK] = top_k_rows(
            queries[start : start + QUERY_CHUNK] @ items.T, k
        )
    return out


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of a ``[queries, items]`` score matrix, the columns of its ``k`` largest scores,
    best first, equal scores to the lower column."""
    scores = np.asarray(scores)
    k = min(int(k), scores.shape[1])
    if k < scores.shape[1]:
        rows = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    else:
        rows = np.broadcast_to(np.arange(k), scores.shape)
    best = np.take_along_axis(scores, rows, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1).astype(np.int64)


def ann_recall(
    approx: Iterable[Iterable[Any]],
    exact: Iterable[Iterable[Any]],
    k: int | None = None,
    *,
    items: np.ndarray | None = None,
    queries: np.ndarray | None = None,
) -> float:
    """Mean share of each query's exact top-k that its approximate top-k contains.

    Args:
        approx: per query, the approximate answer (ids or item rows; best first or not).
        exact: per query, the exact top ids or rows (e.g. :func:`exact_top_k`); may be ragged.
        k: the cut-off for both (default: each exact answer's length).
        items, queries: the item vectors the rows index, and the query vectors. Given them, an
            answer scoring at least the k-th best exact score also counts: items with identical
            vectors are interchangeable, and a small or cold catalogue holds many (cold ads share
            their features' vector), so matching the exact search's arbitrary pick among ties
            would cap recall below 1 even for an exhaustive search.

    Returns:
        The mean over queries with an exact answer; 1.0 when there is none.
    """
    tied = items is not None and queries is not None
    vectors = np.asarray(items, dtype=np.float32) if tied else None
    asked = np.asarray(queries, dtype=np.float32) if tied else None
    shares = []
    for i, (found, best) in enumerate(zip(approx, exact, strict=True)):
        wanted = list(best)[:k] if k is not None else list(best)
        if not wanted:
            continue
        answer = list(found)[: len(wanted)]
        if vectors is not None and asked is not None:
            query = asked[i]
            kth = float((vectors[np.asarray(wanted, dtype=np.int64)] @ query).min())
            scores = vectors[np.asarray(answer, dtype=np.int64)] @ query if answer else np.empty(0)
            tolerance = 1e-5 * max(abs(kth), 1.0)
            hits = min(int(np.sum(scores >= kth - tolerance)), len(wanted))
        else:
            hits = len(set(answer) & set(wanted))
        shares.append(hits / len(wanted))
    return float(np.mean(shares)) if shares else 1.0
