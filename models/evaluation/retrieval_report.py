"""The retrieval report's logic: queries, rankings of every retriever, and the numbers compared.

``pipelines/retrieval_eval.py`` reads the published folders and asks each retriever (two-tower
exact, the ANNOY production path, the popular merge, ALS, popularity) for its candidates; this
module turns those candidate lists into the report: recall@K of the clicked ad, the same on clicks
of ads new that day (cold start), recall of the ground-truth best ads, and how often the day's
most-clicked ads are retrieved at all — the "NAVER failure mode" of similarity-only retrieval,
whose logQ-corrected scores can leave globally popular ads out of most candidate sets. Everything
is numpy/pandas over in-memory inputs, so tests feed it tiny hand-computed cases.

Candidate lists are passed per cut-off (``{K: lists}``): a ranked retriever's top-K is a prefix of
its top-1000, but the popular merge picks a different mix for every K (``K·quota`` popular ads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Protocol

import numpy as np
import pandas as pd

from deepclick.topk import exact_top_k
from models.evaluation.retrieval import recall_at_k

DEFAULT_KS = (50, 100, 500, 1000)
TWO_TOWER_EXACT = "two_tower_exact"
TWO_TOWER_ANN = "two_tower_ann"
TWO_TOWER_POPULAR = "two_tower_popular"
ALS = "als"
POPULARITY_PLACEMENT = "popularity_placement"
POPULARITY_OVERALL = "popularity_overall"
METHODS = (
    TWO_TOWER_EXACT,
    TWO_TOWER_ANN,
    TWO_TOWER_POPULAR,
    ALS,
    POPULARITY_PLACEMENT,
    POPULARITY_OVERALL,
)
POPULARITY_METHODS = (POPULARITY_PLACEMENT, POPULARITY_OVERALL)

Ranked = Any
"""Per query, candidate ad ids best first: a 2-D array or ragged lists (as in ``recall_at_k``)."""
Retrieved = Mapping[int, Ranked]
"""Per cut-off K, each query's (at most) K candidates."""


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """What the retrieval evaluation measures; one object passed down from the runner."""

    ks: tuple[int, ...] = DEFAULT_KS
    max_queries: int = 2000
    """Clicked impressions sampled from the evaluation day (seeded); all when fewer."""
    seed: int = 7
    best_ads_k: int = 10
    """Ground truth: the top-``best_ads_k`` true-p ads of each query (generated data only)."""
    top_clicked_ads: int = 20
    """The most-clicked ads of the day whose retrieval is tracked (the NAVER failure mode)."""
    target_k: int = 500
    target_ratio: float = 2.0
    """DESIGN.md: recall@500 of clicked ads ≥ 2× a popularity baseline."""
    target_method: str = TWO_TOWER_ANN
    """The retriever the target is judged on: what serving runs without the popular quota."""


class VectorTable(Protocol):
    """Sorted ids + vectors with a binary-search lookup (``candidates.store.EmbeddingTable``)."""

    vectors: np.ndarray

    def row(self, entity_id: str) -> int | None: ...


def sample_clicks(
    rows: pd.DataFrame, max_queries: int, seed: int, *, label: str = "label"
) -> pd.DataFrame:
    """The clicked rows of ``rows``, at most ``max_queries`` of them drawn without replacement.

    Rows are put in ``event_id`` order first (when present), so the sample depends on the seed
    and the data, not on how Spark split the Parquet files.
    """
    clicks = rows[rows[label] == 1]
    if "event_id" in clicks.columns:
        clicks = clicks.sort_values("event_id", kind="stable")
    clicks = clicks.reset_index(drop=True)
    if len(clicks) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(len(clicks), max_queries, replace=False))
        clicks = clicks.iloc[keep].reset_index(drop=True)
    return clicks


def table_rows(table: VectorTable, ids: Sequence[str]) -> np.ndarray:
    """Row of each id in ``table`` (the table's own binary search), ``-1`` when unknown."""
    return np.array([-1 if (r := table.row(str(i))) is None else r for i in ids], dtype=np.int64)


def additive_queries(
    users: VectorTable,
    placements: VectorTable,
    fallback_user: np.ndarray,
    fallback_placement: np.ndarray,
    user_ids: Sequence[str],
    placement_ids: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries ``user + placement`` as serving builds them (unknown → the fallback vector).

    Returns ``(queries [n, dim] float32, user_known [n] bool, placement_known [n] bool)``.
    """
    parts = []
    known = []
    for table, fallback, ids in (
        (users, fallback_user, user_ids),
        (placements, fallback_placement, placement_ids),
    ):
        rows = table_rows(table, ids)
        vectors = np.asarray(table.vectors, dtype=np.float32)
        fallback = np.asarray(fallback, dtype=np.float32)
        found = rows >= 0
        part = np.broadcast_to(fallback, (len(rows), fallback.shape[0])).copy()
        if found.any():
            part[found] = vectors[rows[found]]
        parts.append(part)
        known.append(found)
    return (parts[0] + parts[1]).astype(np.float32), known[0], known[1]


def rank_by_dot(queries: np.ndarray, ad_vectors: np.ndarray, ad_ids: Any, k: int) -> np.ndarray:
    """Ad ids of the ``k`` largest ``query·ad`` per query, best first (exact search)."""
    ids = np.asarray([_text(i) for i in np.asarray(ad_ids)], dtype=object)
    if len(ids) == 0:
        return np.empty((len(queries), 0), dtype=object)
    return ids[exact_top_k(queries, ad_vectors, k)]


def prefixes(ranked: Ranked, ks: Sequence[int]) -> dict[int, Ranked]:
    """``{K: each query's first K candidates}`` from one best-first ranking."""
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2:
        return {k: ranked[:, :k] for k in ks}
    return {k: [list(row)[:k] for row in ranked] for k in ks}


@dataclass(frozen=True)
class PopularityLists:
    """Ads most clicked in training first: overall, and per placement."""

    overall: tuple[str, ...]
    by_placement: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def popularity_lists(counts: pd.DataFrame) -> PopularityLists:
    """Rank ads from ``placement_id, ad_id, clicks, impressions`` counts of the training days.

    The order is the features stage's (contracts §3 ``popularity``): more clicks, then more
    impressions, then ``ad_id``. Unlike that table the lists are not cut at ``top_n``, so the
    baseline is not handicapped at K = 500 or 1000. Every ad shown in training is listed.
    """

    def ranked(frame: pd.DataFrame) -> tuple[str, ...]:
        order = frame.sort_values(
            ["clicks", "impressions", "ad_id"], ascending=[False, False, True], kind="stable"
        )
        return tuple(order["ad_id"].astype(str))

    counts = counts.astype({"placement_id": str, "ad_id": str})
    overall = counts.groupby("ad_id", as_index=False)[["clicks", "impressions"]].sum()
    return PopularityLists(
        overall=ranked(overall),
        by_placement={str(p): ranked(group) for p, group in counts.groupby("placement_id")},
    )


def popularity_rankings(
    lists: PopularityLists, placement_ids: Sequence[str], k: int, *, per_placement: bool
) -> list[list[str]]:
    """Each query's top-``k`` popular ads: its placement's list continued by the overall list
    (``per_placement``; a placement without training clicks gets the overall list), else the
    overall list for everyone."""
    overall = list(lists.overall[:k])
    if not per_placement:
        return [overall] * len(placement_ids)
    cache: dict[str, list[str]] = {}
    out = []
    for placement in placement_ids:
        key = str(placement)
        if key not in cache:
            own = list(lists.by_placement.get(key, ())[:k])
            seen = set(own)
            cache[key] = own + [a for a in lists.overall if a not in seen][: k - len(own)]
        out.append(cache[key])
    return out


def _subset(ranked: Ranked, rows: np.ndarray | None) -> Ranked:
    if rows is None:
        return ranked
    if isinstance(ranked, np.ndarray):
        return ranked[rows]
    return [ranked[i] for i in rows]


def method_recall(retrieved: Retrieved, relevant: Any, rows: np.ndarray | None = None) -> dict:
    """``{K: recall@K}`` of one retriever, over all queries or the query indices ``rows``
    (None per K when ``rows`` is empty: no such queries)."""
    if rows is not None and len(rows) == 0:
        return dict.fromkeys(retrieved)
    wanted = _subset(relevant, rows)
    out = {}
    for k, ranked in retrieved.items():
        lists = _subset(ranked, rows)
        if isinstance(wanted, np.ndarray) and wanted.ndim == 2 and isinstance(lists, np.ndarray):
            out[k] = _set_recall(lists, wanted, k)
        else:
            out[k] = recall_at_k(lists, wanted, [k])[k]
    return out


def _set_recall(lists: np.ndarray, wanted: np.ndarray, k: int, chunk: int = 256) -> float:
    """``recall_at_k`` when every query has the same number m of relevant ids, computed as m
    one-id queries per query (the mean of hits/m over queries equals the mean over the pairs):
    ``recall_at_k`` compares a set of ids element by element as Python objects, which is slow
    for 10 ids × 1000 candidates × thousands of queries."""
    m = wanted.shape[1]
    if len(lists) == 0 or m == 0:
        return 0.0
    total = 0.0
    for start in range(0, len(lists), chunk):
        block = lists[start : start + chunk]
        pairs = recall_at_k(np.repeat(block, m, axis=0), wanted[start : start + chunk].ravel(), [k])
        total += pairs[k] * len(block)
    return total / len(lists)


def recall_curves(
    retrieved: Mapping[str, Retrieved], relevant: Any, rows: np.ndarray | None = None
) -> dict[str, dict[int, float | None]]:
    """``{method: {K: recall@K}}`` for every retriever on the same queries."""
    return {name: method_recall(lists, relevant, rows) for name, lists in retrieved.items()}


def most_clicked(ad_ids: Sequence[str] | pd.Series, n: int) -> list[str]:
    """The ``n`` ads with the most clicks in ``ad_ids`` (one entry per click), ties by id."""
    counts = pd.Series(np.asarray(ad_ids, dtype=str)).value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [ad for ad, _ in ordered[:n]]


def top_ads_coverage(retrieved: Retrieved, top_ads: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """How visible the most-clicked ads are to a retriever, per K.

    ``ever_retrieved``: how many of ``top_ads`` are in at least one query's candidates;
    ``mean_query_share``: averaged over ``top_ads``, the share of queries whose candidates hold it.
    """
    wanted = np.asarray(top_ads)
    out: dict[int, dict[str, Any]] = {}
    for k, ranked in retrieved.items():
        if len(wanted) == 0:
            out[k] = {"ever_retrieved": 0, "mean_query_share": 0.0}
            continue
        if isinstance(ranked, np.ndarray) and ranked.ndim == 2 and ranked.dtype.kind in "iu":
            hits = (ranked[:, :, None] == wanted[None, None, :]).any(axis=1)
        else:
            lists = [set(map(_text, row)) for row in ranked]
            hits = np.array([[_text(a) in row for a in wanted] for row in lists], dtype=bool)
        hits = hits.reshape(-1, len(wanted))
        out[k] = {
            "ever_retrieved": int(hits.any(axis=0).sum()),
            "mean_query_share": _round(float(hits.mean())) if hits.size else 0.0,
        }
    return out


def recall_ratio(
    curves: Mapping[str, Mapping[int, float | None]], numerator: str, denominator: str, k: int
) -> float | None:
    """``recall@k(numerator) / recall@k(denominator)``; None when undefined."""
    top = curves.get(numerator, {}).get(k)
    bottom = curves.get(denominator, {}).get(k)
    if top is None or not bottom:
        return None
    return float(top / bottom)


def target_check(
    curves: Mapping[str, Mapping[int, float | None]], config: RetrievalEvalConfig
) -> dict[str, Any]:
    """DESIGN.md's retrieval target, judged against the STRONGER popularity baseline."""
    k = config.target_k
    present = [m for m in POPULARITY_METHODS if curves.get(m, {}).get(k) is not None]
    baseline = max(present, key=lambda m: curves[m][k]) if present else None
    ratios = {
        name: (recall_ratio(curves, name, baseline, k) if baseline else None)
        for name in curves
        if name not in POPULARITY_METHODS
    }
    judged = ratios.get(config.target_method)
    return {
        "k": k,
        "baseline": baseline,
        "method": config.target_method,
        "target_ratio": config.target_ratio,
        "ratio": {name: _round(value) for name, value in ratios.items()},
        "met": None if judged is None else bool(judged >= config.target_ratio),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)


def keyed(curves: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: {K: value}}`` with string K, the JSON form (what ``json.load`` gives back)."""
    return {name: {str(k): _round(v) for k, v in curve.items()} for name, curve in curves.items()}


def _round(value: Any) -> Any:
    return round(float(value), 6) if isinstance(value, float | np.floating) else value


def encode(retrieved: Mapping[str, Retrieved], *relevant: Any) -> tuple[dict, list]:
    """Ids as integer codes (``-1`` pads short lists), so recall is computed on integer arrays
    instead of millions of Python string comparisons. Returns the encoded ``retrieved`` and each
    ``relevant`` argument encoded (1-D for one id per query, 2-D for a rectangular list of ids).
    """
    flats = {
        (name, k): _ragged(ranked)
        for name, lists in retrieved.items()
        for k, ranked in lists.items()
    }
    wanted = [None if r is None else _ragged(r if np.ndim(r) == 2 else [r]) for r in relevant]
    pieces = [flat for flat, _ in flats.values()] + [w[0] for w in wanted if w is not None]
    vocab = pd.Index(pd.unique(np.concatenate([np.asarray([], dtype=object), *pieces])))
    coded: dict[str, dict[int, np.ndarray]] = {name: {} for name in retrieved}
    for (name, k), (flat, lengths) in flats.items():
        coded[name][k] = _codes(flat, lengths, vocab)
    targets = [
        None if w is None else (_codes(*w, vocab) if np.ndim(r) == 2 else _codes(*w, vocab)[0])
        for r, w in zip(relevant, wanted, strict=True)
    ]
    return coded, targets


def _ragged(ranked: Ranked) -> tuple[np.ndarray, np.ndarray]:
    """All ids of ``ranked`` as one flat object array of ``str``, and each row's length."""
    if isinstance(ranked, np.ndarray) and ranked.ndim == 2:
        flat, lengths = ranked.ravel(), np.full(ranked.shape[0], ranked.shape[1])
    else:
        rows = [list(row) for row in ranked]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        flat = np.empty(int(lengths.sum()), dtype=object)
        flat[:] = list(chain.from_iterable(rows))
    if flat.dtype.kind == "S" or (flat.size and isinstance(flat[0], bytes | np.bytes_)):
        flat = np.asarray([_text(v) for v in flat], dtype=object)
    return flat.astype(object), lengths


def _codes(flat: np.ndarray, lengths: np.ndarray, vocab: pd.Index) -> np.ndarray:
    """Codes of ``flat`` laid back into rows of ``lengths``, padded with -1."""
    codes = vocab.get_indexer(flat)
    width = int(lengths.max(initial=0))
    if len(lengths) and (lengths == width).all():
        return codes.reshape(len(lengths), width)
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, np.arange(len(flat)) - starts] = codes
    return out


def retrieval_report(
    retrieved: Mapping[str, Retrieved],
    clicked: Sequence[str],
    *,
    new_ad: np.ndarray,
    config: RetrievalEvalConfig,
    top_ads: Sequence[str],
    best_ads: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every number of the report that comes from the candidate lists (JSON-ready, K as text).

    Args:
        retrieved: per retriever, ``{K: candidate lists}``, one list per query.
        clicked: the clicked ad of each query.
        new_ad: per query, whether the clicked ad had no impression in training (cold start).
        config: cut-offs, target and sizes.
        top_ads: the day's most-clicked ads (tracked for the popularity blind spot).
        best_ads: per query, its ground-truth best ads (generated data; same count per query),
            else None.
    """
    clicked = [_text(a) for a in clicked]
    top = [_text(a) for a in top_ads]
    coded, (relevant, tops, truth) = encode(
        retrieved,
        np.asarray(clicked, dtype=object),
        np.asarray(top, dtype=object),
        None if best_ads is None else [[_text(a) for a in row] for row in best_ads],
    )
    curves = recall_curves(coded, relevant)
    new = np.asarray(new_ad, dtype=bool)
    new_rows, warm_rows = np.flatnonzero(new), np.flatnonzero(~new)
    report: dict[str, Any] = {
        "recall_at_k": keyed(curves),
        "target": target_check(curves, config),
        "cold_start": {
            "clicks_on_new_ads": len(new_rows),
            "share_of_clicks": _round(len(new_rows) / len(clicked)) if clicked else 0.0,
            "recall_at_k": keyed(recall_curves(coded, relevant, new_rows)),
            "warm_recall_at_k": keyed(recall_curves(coded, relevant, warm_rows)),
        },
        "popular_ads": {
            "top_ads": top,
            "share_of_sampled_clicks": _round(float(np.isin(relevant, tops).mean()))
            if clicked
            else 0.0,
            "coverage": {
                name: {str(k): v for k, v in top_ads_coverage(lists, tops).items()}
                for name, lists in coded.items()
            },
        },
        "ground_truth": None,
    }
    if truth is not None:
        report["ground_truth"] = {
            "best_ads_k": int(truth.shape[1]),
            "recall_at_k": keyed(recall_curves(coded, truth)),
        }
    return report
