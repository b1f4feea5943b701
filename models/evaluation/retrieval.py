"""Retrieval metrics: recall@K of clicked ads and its plot.

Pure numpy (plus matplotlib's object API on an Agg canvas for the PNG), so the two-tower
evaluation, the retrieval evaluation, the replay and the benchmarks measure retrieval the same way.

- :func:`recall_at_k` — for each query, the share of its relevant items (the clicked ad, or a
  set) found in the first K entries of its ranked candidate list; averaged over queries, for
  several K at once. A list shorter than K simply has fewer chances.
- :func:`recall_per_query` — the same, query by query, for paired comparisons.

Exact top-k and the recall of an approximate search against it live in ``deepclick.topk``
(``exact_top_k``, ``ann_recall``), one home for the index build, serving and the evaluations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_recall_at_k", "recall_at_k", "recall_per_query"]

QUERY_CHUNK = 1024


def _padded(rows: Any, fill: Any) -> np.ndarray:
    """A 2-D array from a 2-D array or a sequence of (ragged) sequences, short rows padded."""
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return rows
    lists = [list(row) for row in rows]
    width = max((len(row) for row in lists), default=0)
    out = np.empty((len(lists), width), dtype=object)
    out[:] = fill
    for i, row in enumerate(lists):
        out[i, : len(row)] = row
    return out


class _Unmatched:
    """Padding that equals nothing, so padded slots never count as hits."""

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return id(self)


def recall_at_k(ranked: Any, relevant: Any, ks: Iterable[int]) -> dict[int, float]:
    """Mean recall@K of relevant items in ranked candidate lists.

    Args:
        ranked: per query, candidate ids best first — a 2-D array ``[n, L]`` or ragged lists.
        relevant: per query, the relevant id (1-D array of n ids: one click per query) or a
            collection of relevant ids. Queries with no relevant id are left out of the mean.
        ks: cut-offs; each must be ≥ 1.

    Returns:
        ``{K: mean over queries of |top-K ∩ relevant| / |relevant|}`` (0.0 without queries).

    Raises:
        ValueError: ranked and relevant disagree in length, or a K is below 1.
    """
    per_query = recall_per_query(ranked, relevant, ks)
    return {
        k: float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        for k, values in per_query.items()
    }


def recall_per_query(ranked: Any, relevant: Any, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """Each query's recall@K (``|top-K ∩ relevant| / |relevant|``; NaN for a query with no
    relevant id), so that two candidate sources measured on the same queries can be compared
    pair by pair (the gate's paired recall interval). Arguments as :func:`recall_at_k`."""
    cutoffs = sorted(set(int(k) for k in ks))
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"recall@K needs cut-offs K >= 1, got {list(ks)}")
    pad = _Unmatched()
    lists = _padded(ranked, pad)
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
        targets = relevant[:, None]
    else:
        targets = _padded(
            [[r] if isinstance(r, str | bytes) or np.isscalar(r) else r for r in relevant], pad
        )
    if len(lists) != len(targets):
        raise ValueError(
            f"ranked has {len(lists)} queries but relevant has {len(targets)}: one entry per query"
        )
    if targets.dtype == object:
        valid = np.vectorize(lambda v: v is not pad, otypes=[bool])(targets)
    else:
        valid = np.ones(targets.shape, dtype=bool)
    found = {k: np.full(len(lists), np.nan) for k in cutoffs}
    for start in range(0, len(lists), QUERY_CHUNK):
        rows = lists[start : start + QUERY_CHUNK]
        wanted = targets[start : start + QUERY_CHUNK]
        ok = valid[start : start + QUERY_CHUNK]
        match = rows[:, :, None] == wanted[:, None, :]  # [q, L, m]
        first = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
        sizes = ok.sum(axis=1)
        keep = sizes > 0
        chunk = slice(start, start + len(rows))
        for k in cutoffs:
            hits = ((first < k) & ok).sum(axis=1)
            recall = np.full(len(rows), np.nan)
            recall[keep] = hits[keep] / sizes[keep]
            found[k][chunk] = recall
    return found


def plot_recall_at_k(
    curves: Mapping[str, Mapping[int, float]], path: Path, *, title: str = "recall@K"
) -> Path:
    """Write a PNG with one recall@K line per retriever (name → {K: recall}); return ``path``."""
    path = Path(path)
    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    all_k: set[int] = set()
    for name, curve in curves.items():
        ks: Sequence[int] = sorted(curve)
        all_k.update(ks)
        axes.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    if all_k and max(all_k) / max(min(all_k), 1) >= 20:
        axes.set_xscale("log")
    axes.set_xlabel("K (candidates retrieved)")
    axes.set_ylabel("recall@K of clicked ads")
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, alpha=0.3)
    axes.set_title(title)
    if curves:
        axes.legend(loc="lower right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
