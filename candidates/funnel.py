"""The funnel's rule: candidates never hold fewer of a day's clicks than as many popular ads.

Why the prior. The towers learn with a logQ-corrected in-batch softmax (models/two_tower/model.py):
the correction takes each ad's click share out of the training logits, so ``query·ad`` ranks ads by
how well they *match*, not by how often they are clicked at all. On the generated marketplace the
clicks follow a heavy-tailed ad quality that popularity captures well, and similarity alone lost to
"the most clicked ads" (demo: recall@500 0.255 vs 0.484). Mixed negatives in the tower loss (uniform
catalogue ads beside the in-batch ones) narrowed the gap — similarity alone 0.78x -> 0.94x of
popularity at K = 500 at medium scale — but did not close it. Serving therefore ranks candidates by

    query·ad + prior_weight · log(training clicks of the ad + prior_smoothing)

(the popularity term the loss removed, put back with a weight chosen by measurement, README
"Candidates"), while ``explore_share`` of every list is still filled by similarity alone.

Why fresh slots. Similarity and the prior rank a new ad against ads with history, and it rarely
wins: embedded under the id table's out-of-vocabulary row (which the rarest ads trained, and the
uniform negatives pushed down), no ad without training rows was in any list of 500 at demo or
medium scale, though such ads draw 3% of the day's clicks; embedded as "no id" (``pipelines.embed``)
a few get in, not a guaranteed few. ``fresh_share`` of every list goes to the ads *without rows in
the training window* (``fresh.npy`` of the index), best ``query·ad`` first among them: in those
slots a new ad competes with the other new ads only. They are exploration, a budget spent on
purpose: no popular ad can hold a click on a fresh ad, and a fresh ad wins a slot less often than
the marginal popular ad does.

Why the refusal. Whatever the weight, a build may still lose to popularity on some day (new
towers, a shifted marketplace). :func:`funnel_check` measures, on day D's clicked impressions, the
share of clicks whose ad is among the query's K candidates and among the K most clicked training
ads, at every K; the index build refuses to publish (the previous index keeps serving) when the
candidates hold fewer at any K than popularity does, beyond ``tolerance`` and ``z`` standard errors
of the paired difference (a few clicks of a few hundred are noise, not a verdict). The fresh slots
are counted apart: each list's other ads are compared with as many popular ads as they are, and the
clicks the fresh slots find are reported beside (``fresh`` in the result).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deepclick.publish import PublishError


class FunnelRefused(PublishError):
    """The candidates held fewer of day D's clicks than the same number of popular ads."""


@dataclass(frozen=True)
class FunnelParams:
    """How serving orders candidates (recorded in the index manifest, read back by serving).

    ``prior_weight`` 0 keeps pure similarity plus the popular quota (indexes built before the
    prior existed read as 0, before fresh slots existed ``fresh_share`` 0).
    """

    prior_weight: float = 0.0
    prior_smoothing: float = 1.0
    explore_share: float = 0.0
    fresh_share: float = 0.0

    def __post_init__(self) -> None:
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.prior_smoothing <= 0:
            raise ValueError(
                f"prior_smoothing must be > 0 (log of 0 clicks), got {self.prior_smoothing}"
            )
        for name in ("explore_share", "fresh_share"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {share}")

    def describe(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> FunnelParams:
        found = manifest.get("funnel") or {}
        return cls(
            prior_weight=float(found.get("prior_weight", 0.0)),
            prior_smoothing=float(found.get("prior_smoothing", 1.0)),
            explore_share=float(found.get("explore_share", 0.0)),
            fresh_share=float(found.get("fresh_share", 0.0)),
        )


def popularity_prior(
    ad_ids: Sequence[Any] | np.ndarray, clicks: Mapping[str, float], smoothing: float
) -> np.ndarray:
    """``log(clicks + smoothing)`` per ad, row i for ``ad_ids[i]`` (bytes or str); ads without
    training clicks get ``log(smoothing)``, the lowest value."""
    out = np.empty(len(ad_ids), dtype=np.float32)
    for i, ad in enumerate(ad_ids):
        key = ad.decode("utf-8") if isinstance(ad, bytes | np.bytes_) else str(ad)
        out[i] = np.log(max(float(clicks.get(key, 0.0)), 0.0) + smoothing)
    return out


def hits(lists: Sequence[Sequence[str]], clicked: Sequence[str], k: int) -> np.ndarray:
    """Per click, 1 when its ad is in the first ``k`` entries of its query's list."""
    return np.array(
        [ad in set(ranked[:k]) for ranked, ad in zip(lists, clicked, strict=True)], dtype=float
    )


def funnel_check(
    candidates: Mapping[int, Sequence[Sequence[str]]],
    popular: Sequence[str],
    clicked: Sequence[str],
    *,
    tolerance: float = 0.0,
    z: float = 0.0,
    min_clicks: int = 1,
    fresh: Collection[str] = (),
) -> dict[str, Any]:
    """Compare the candidates with the same number of popular ads on one day's clicks.

    The comparison is paired (the same clicks for both), so its noise is the standard error of the
    per-click difference ``found by candidates − found by popular ads``; a loss smaller than
    ``z`` standard errors is noise (decision ``pass``, with the loss in ``within_noise_ks``).

    Fresh ads (no training rows) are counted apart: a list that holds ``f`` of them among its
    first K is judged by its other ads against the ``K − f`` most clicked ads, and the share of
    clicks on fresh ads its fresh slots find is reported beside. Without fresh ads the judged
    figures are the whole lists' (``recall`` / ``popularity``).

    Args:
        candidates: ``{K: per clicked impression, the K candidates serving returns}``.
        popular: the most clicked training ads, most clicked first (at least max K of them, or
            all there are).
        clicked: per clicked impression, the ad that was clicked.
        tolerance: the candidates may hold this much less (absolute share) than popularity.
        z: and this many standard errors of the paired difference (0: the strict rule).
        min_clicks: with fewer clicks the day cannot decide; the result says so and passes.
        fresh: the ads without training rows (the index's fresh rows), counted apart.

    Returns:
        ``{"clicks", "decision", "recall": {K: ...}, "popularity": {K: ...}, "ratio": {K: ...},
        "difference_se": {K: ...}, "losing_ks": [...], "within_noise_ks": [...]}`` with decision
        ``pass``, ``refuse`` or ``insufficient_evidence``; with ``fresh`` also ``"judged": {K:
        {"candidates", "popularity"}}`` (what the decision compares, ``ratio`` and
        ``difference_se`` are of these) and ``"fresh": {"clicks", "recall": {K: ...}, "slots":
        {K: mean fresh ads per list}}``.
    """
    ks = sorted(candidates)
    n = len(clicked)
    fresh = set(fresh)
    on_fresh = np.array([ad in fresh for ad in clicked], dtype=bool)
    popular_rank = {ad: rank for rank, ad in enumerate(popular)}
    click_rank = np.array([popular_rank.get(ad, len(popular)) for ad in clicked])
    recall, baseline, judged, judged_baseline, se = {}, {}, {}, {}, {}
    fresh_recall, fresh_slots = {}, {}
    for k in ks:
        lists = candidates[k]
        ours = hits(lists, clicked, k)
        slots = np.array([sum(ad in fresh for ad in ranked[:k]) for ranked in lists], dtype=int)
        ours_judged = ours * ~on_fresh
        theirs_full = (click_rank < k).astype(float)
        theirs = (click_rank < k - slots).astype(float)
        recall[k], baseline[k] = _mean(ours), _mean(theirs_full)
        judged[k], judged_baseline[k] = _mean(ours_judged), _mean(theirs)
        se[k] = float(np.std(ours_judged - theirs, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        fresh_recall[k] = _mean(ours[on_fresh])
        fresh_slots[k] = _mean(slots)
    behind = [k for k in ks if judged[k] < judged_baseline[k] - tolerance]
    losing = [k for k in behind if judged[k] < judged_baseline[k] - tolerance - z * se[k]]
    decision = "insufficient_evidence" if n < min_clicks else "refuse" if losing else "pass"
    result: dict[str, Any] = {
        "clicks": n,
        "decision": decision,
        "tolerance": tolerance,
        "z": z,
        "recall": {str(k): round(recall[k], 6) for k in ks},
        "popularity": {str(k): round(baseline[k], 6) for k in ks},
        "ratio": {
            str(k): round(judged[k] / judged_baseline[k], 4) if judged_baseline[k] > 0 else None
            for k in ks
        },
        "difference_se": {str(k): round(se[k], 6) for k in ks},
        "losing_ks": losing,
        "within_noise_ks": [k for k in behind if k not in losing],
    }
    if fresh:
        result["judged"] = {
            str(k): {"candidates": round(judged[k], 6), "popularity": round(judged_baseline[k], 6)}
            for k in ks
        }
        result["fresh"] = {
            "clicks": int(on_fresh.sum()),
            "recall": {str(k): round(fresh_recall[k], 6) for k in ks},
            "slots": {str(k): round(fresh_slots[k], 4) for k in ks},
        }
    return result


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else 0.0


def refusal_message(version: str, date: str, result: Mapping[str, Any]) -> str:
    """Why an index was refused, with the numbers and the way out."""
    judged = result.get("judged") or {
        k: {"candidates": result["recall"][k], "popularity": result["popularity"][k]}
        for k in result["recall"]
    }
    worst = ", ".join(
        f"K={k}: {judged[str(k)]['candidates']:.4f} vs {judged[str(k)]['popularity']:.4f}"
        for k in result["losing_ks"]
    )
    return (
        f"index {version}: its candidates hold fewer of {date}'s {result['clicks']} clicks than "
        f"the same number of most clicked ads ({worst}); not published, the previous index keeps "
        "serving — raise index.prior_weight or index.popular_quota, or retrain the towers"
    )
