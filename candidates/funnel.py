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
"Candidates"), while ``explore_share`` of every list is still filled by similarity alone, so an ad
without clicks yet (cold start) keeps a way in when it matches the query.

Why the refusal. Whatever the weight, a build may still lose to popularity on some day (new
towers, a shifted marketplace). :func:`funnel_check` measures, on day D's clicked impressions, the
share of clicks whose ad is among the query's K candidates and among the K most clicked training
ads, at every K; the index build refuses to publish (the previous index keeps serving) when the
candidates hold fewer at any K than popularity does, beyond ``tolerance`` and ``z`` standard errors
of the paired difference (a few clicks of a few hundred are noise, not a verdict).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    prior existed read as 0).
    """

    prior_weight: float = 0.0
    prior_smoothing: float = 1.0
    explore_share: float = 0.0

    def __post_init__(self) -> None:
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.prior_smoothing <= 0:
            raise ValueError(
                f"prior_smoothing must be > 0 (log of 0 clicks), got {self.prior_smoothing}"
            )
        if not 0.0 <= self.explore_share <= 1.0:
            raise ValueError(f"explore_share must be within [0, 1], got {self.explore_share}")

    def describe(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> FunnelParams:
        found = manifest.get("funnel") or {}
        return cls(
            prior_weight=float(found.get("prior_weight", 0.0)),
            prior_smoothing=float(found.get("prior_smoothing", 1.0)),
            explore_share=float(found.get("explore_share", 0.0)),
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
) -> dict[str, Any]:
    """Compare the candidates with the same number of popular ads on one day's clicks.

    The comparison is paired (the same clicks for both), so its noise is the standard error of the
    per-click difference ``found by candidates − found by popular ads``; a loss smaller than
    ``z`` standard errors is noise (decision ``pass``, with the loss in ``within_noise_ks``).

    Args:
        candidates: ``{K: per clicked impression, the K candidates serving returns}``.
        popular: the most clicked training ads, most clicked first (at least max K of them, or
            all there are).
        clicked: per clicked impression, the ad that was clicked.
        tolerance: the candidates may hold this much less (absolute share) than popularity.
        z: and this many standard errors of the paired difference (0: the strict rule).
        min_clicks: with fewer clicks the day cannot decide; the result says so and passes.

    Returns:
        ``{"clicks", "decision", "recall": {K: ...}, "popularity": {K: ...}, "ratio": {K: ...},
        "difference_se": {K: ...}, "losing_ks": [...], "within_noise_ks": [...]}`` with decision
        ``pass``, ``refuse`` or ``insufficient_evidence``.
    """
    ks = sorted(candidates)
    n = len(clicked)
    recall, baseline, se = {}, {}, {}
    for k in ks:
        ours = hits(candidates[k], clicked, k)
        top = set(popular[:k])
        theirs = np.array([ad in top for ad in clicked], dtype=float)
        recall[k] = float(ours.mean()) if n else 0.0
        baseline[k] = float(theirs.mean()) if n else 0.0
        se[k] = float(np.std(ours - theirs, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    behind = [k for k in ks if recall[k] < baseline[k] - tolerance]
    losing = [k for k in behind if recall[k] < baseline[k] - tolerance - z * se[k]]
    decision = "insufficient_evidence" if n < min_clicks else "refuse" if losing else "pass"
    return {
        "clicks": n,
        "decision": decision,
        "tolerance": tolerance,
        "z": z,
        "recall": {str(k): round(recall[k], 6) for k in ks},
        "popularity": {str(k): round(baseline[k], 6) for k in ks},
        "ratio": {
            str(k): round(recall[k] / baseline[k], 4) if baseline[k] > 0 else None for k in ks
        },
        "difference_se": {str(k): round(se[k], 6) for k in ks},
        "losing_ks": losing,
        "within_noise_ks": [k for k in behind if k not in losing],
    }


def refusal_message(version: str, date: str, result: Mapping[str, Any]) -> str:
    """Why an index was refused, with the numbers and the way out."""
    worst = ", ".join(
        f"K={k}: {result['recall'][str(k)]:.4f} vs {result['popularity'][str(k)]:.4f}"
        for k in result["losing_ks"]
    )
    return (
        f"index {version}: its candidates hold fewer of {date}'s {result['clicks']} clicks than "
        f"the same number of most clicked ads ({worst}); not published, the previous index keeps "
        "serving — raise index.prior_weight or index.popular_quota, or retrain the towers"
    )
