"""Offline ranking metrics: pure functions of labels and predicted probabilities.

These are the numbers DESIGN.md's targets are stated in — AUC (with a bootstrap interval, since a
0.01 gain over the baseline must be told apart from noise), log loss, normalized entropy and the
calibration ratio (predicted / observed clicks), overall and per placement, plus the oracle AUC of
the true click probabilities when the data is simulated (the ceiling any model can reach). No I/O,
no TensorFlow: the report, the training loop and the tests all call these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from deepclick.errors import DeepclickError

LOG_EPS = 1e-7
"""Probabilities are clipped to [eps, 1 - eps] inside log loss, so one 0 or 1 cannot make it ∞."""


class EvaluationError(DeepclickError, ValueError):
    """An evaluation that cannot produce a meaningful number; the message says which and why."""


class EmptyEvaluationError(EvaluationError):
    """The evaluation set has no rows."""


class SingleClassError(EvaluationError):
    """All labels are equal, so AUC (and the calibration ratio, without clicks) is undefined."""


def _arrays(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        raise EmptyEvaluationError("no rows to evaluate: labels and scores are empty")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, p


def _clicks(labels: Any, probabilities: Any, what: str) -> tuple[int, float]:
    """Observed clicks and predicted clicks (the sum of probabilities) of the calibration
    metrics; raises :class:`SingleClassError` naming ``what`` when nothing was clicked."""
    y, p = _arrays(labels, probabilities)
    clicks = int(y.sum())
    if clicks == 0:
        raise SingleClassError(_single_class_message(y, what))
    return clicks, float(p.sum())


def _single_class_message(y: np.ndarray, what: str) -> str:
    clicks = int(y.sum())
    return (
        f"{what} is undefined: all {y.size} rows are {'clicks' if clicks else 'non-clicks'} "
        f"({clicks} clicks); it needs both classes"
    )


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: the chance a random click scores above a random non-click (ties
    count half), computed from the average ranks (Mann–Whitney U).

    Raises:
        SingleClassError: all labels are equal.
    """
    y, p = _arrays(labels, scores)
    return _auc(y, p)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    positives = float(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        raise SingleClassError(_single_class_message(y, "AUC"))
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auc_interval(
    labels: Any, scores: Any, *, samples: int = 200, level: float = 0.95, seed: int = 7
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (rows resampled with replacement, seeded).

    Resamples that happen to hold one class are drawn again, so small sets still get an interval.
    """
    y, p = _arrays(labels, scores)
    _auc(y, p)  # raises on a single class before any resampling
    ordered = _ScoreOrder.of(y, p)
    return _bootstrap(
        y, lambda idx: ordered.auc(_multiplicities(idx, y.size)), samples, level, seed
    )


def _multiplicities(idx: np.ndarray, n: int) -> np.ndarray:
    """How many times a resample drew each row."""
    return np.bincount(idx, minlength=n).astype(np.float64)


class _ScoreOrder:
    """Rows sorted by score once, with their tie groups, so that the AUC of a bootstrap
    resample is one weighted pass over the rows (each weighted by how often the resample drew
    it) rather than a new sort: the same number as :func:`_auc` of the resampled rows, so the
    same intervals, about four times faster on 1.25M rows (63 against 280 ms per resample),
    where 200 resamples per scorer were about 2.5 of the 10M evaluate stage's 6 minutes."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, positive: np.ndarray) -> None:
        self.order = order
        self.starts = starts  # where each run of equal scores begins in ``order``
        self.positive = positive  # labels in ``order``

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray) -> _ScoreOrder:
        order = np.argsort(p, kind="stable")
        sorted_scores = p[order]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        return cls(order, starts, y[order])

    def auc(self, weights: np.ndarray) -> float:
        """Mann-Whitney AUC with each row counted ``weights[row]`` times (ties count half)."""
        w = weights[self.order]
        clicks = w * self.positive
        others = w - clicks
        if self.starts.size < w.size:  # some scores tie: sum each run of equal scores
            clicks = np.add.reduceat(clicks, self.starts)
            others = np.add.reduceat(others, self.starts)
        below = np.cumsum(others) - others
        return float((clicks * (below + 0.5 * others)).sum() / (clicks.sum() * others.sum()))


def _bootstrap(
    y: np.ndarray, statistic: Callable[[np.ndarray], float], samples: int, level: float, seed: int
) -> tuple[float, float]:
    """Seeded percentile interval of ``statistic(row indices)`` over row resamples; resamples that
    hold one class are drawn again (up to ten times the requested count)."""
    rng = np.random.default_rng(seed)
    values: list[float] = []
    attempts = 0
    while len(values) < samples and attempts < samples * 10:
        attempts += 1
        idx = rng.integers(0, y.size, y.size)
        if 0 < y[idx].sum() < y.size:
            values.append(statistic(idx))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def auc_difference_interval(
    labels: Any,
    first: Any,
    second: Any,
    *,
    samples: int = 200,
    level: float = 0.95,
    seed: int = 7,
) -> tuple[float, float, float]:
    """AUC(first) − AUC(second) on the same rows, with a paired percentile bootstrap interval
    (both models scored on each resample), which is far tighter than two separate intervals
    because the models' errors on a row move together. Returns ``(difference, low, high)``."""
    y, a = _arrays(labels, first)
    _, b = _arrays(labels, second)
    difference = _auc(y, a) - _auc(y, b)
    if not samples:
        return difference, difference, difference
    first_order, second_order = _ScoreOrder.of(y, a), _ScoreOrder.of(y, b)

    def resampled(idx: np.ndarray) -> float:
        weights = _multiplicities(idx, y.size)
        return first_order.auc(weights) - second_order.auc(weights)

    low, high = _bootstrap(y, resampled, samples, level, seed)
    return difference, low, high


def paired_mean_difference(
    first: Any, second: Any, *, samples: int = 200, level: float = 0.95, seed: int = 7
) -> tuple[float, float, float]:
    """mean(first) − mean(second) of two measurements of the same units (e.g. each sampled
    click's recall@K through two candidate sources), with a seeded paired percentile bootstrap
    interval: units are resampled, both measurements together. Units that agree (both found or
    both missed) move nothing, so the interval reflects only the discordant ones — far tighter
    than two binomial intervals taken as independent. Returns ``(difference, low, high)``.

    Raises:
        ValueError: the two differ in length or hold no unit.
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"a paired difference needs two equal-length 1-D measurements, got {a.shape} and "
            f"{b.shape}"
        )
    delta = a - b
    difference = float(delta.mean())
    if not samples:
        return difference, difference, difference
    rng = np.random.default_rng(seed)
    means = delta[rng.integers(0, delta.size, (samples, delta.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return difference, float(low), float(high)


def click_count_interval(clicks: int, *, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) Poisson interval of an observed click count: the range of expected counts
    that the observed one is consistent with. 0 clicks → ``(0, upper)``."""
    from scipy.stats import chi2

    if clicks < 0:
        raise ValueError(f"a click count is never negative, got {clicks}")
    tail = (1.0 - level) / 2.0
    low = 0.0 if clicks == 0 else float(chi2.ppf(tail, 2 * clicks) / 2.0)
    high = float(chi2.ppf(1.0 - tail, 2 * clicks + 2) / 2.0)
    return low, high


def proportion_interval(hits: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (e.g. recall@K over ``n`` sampled clicks)."""
    from scipy.stats import norm

    if n <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(1.0 - (1.0 - level) / 2.0))
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration_interval(
    labels: Any, probabilities: Any, *, level: float = 0.95
) -> tuple[float, float]:
    """Interval of the calibration ratio from the interval of the click count: predicted clicks
    over the highest and the lowest expected count consistent with the observed clicks. A ratio
    whose interval holds 1.0 is calibrated as far as this day can tell — 30 clicks cannot tell
    0.9 from 1.1, 30,000 can (issue 10: the bound is not a fixed ±10 %).

    Raises:
        SingleClassError: no observed clicks.
    """
    clicks, predicted = _clicks(labels, probabilities, "calibration interval")
    low, high = click_count_interval(clicks, level=level)
    return predicted / high, predicted / low


def logloss(labels: Any, probabilities: Any) -> float:
    """Mean negative log-likelihood of the labels under the probabilities (natural log)."""
    y, p = _arrays(labels, probabilities)
    p = np.clip(p, LOG_EPS, 1.0 - LOG_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def entropy(rate: float) -> float:
    """Log loss of always predicting the base rate: the yardstick of normalized entropy."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def normalized_entropy(labels: Any, probabilities: Any) -> float:
    """Log loss divided by the entropy of the observed click rate (He et al. 2014): 1.0 is no better
    than predicting the average CTR, lower is better, and unlike raw log loss it compares across
    days with different base rates.

    Raises:
        SingleClassError: all labels are equal (the base-rate entropy is 0).
    """
    y, p = _arrays(labels, probabilities)
    base = entropy(float(y.mean()))
    if base == 0.0:
        raise SingleClassError(_single_class_message(y, "normalized entropy"))
    return logloss(y, p) / base


def calibration_ratio(labels: Any, probabilities: Any) -> float:
    """Predicted clicks over observed clicks (sum of probabilities / sum of labels); 1.0 is perfect,
    above 1 over-predicts. Bid × pctr auctions need this near 1, whatever the AUC.

    Raises:
        SingleClassError: no observed clicks.
    """
    clicks, predicted = _clicks(labels, probabilities, "calibration ratio")
    return predicted / clicks


def reliability(labels: Any, probabilities: Any, *, bins: int = 10) -> list[dict[str, float]]:
    """Rows grouped into ``bins`` quantile bins of the prediction: mean predicted vs observed rate
    (the points of a reliability diagram). Quantile bins keep every point backed by data, where
    fixed-width bins would leave the upper bins of a 3 % CTR empty."""
    y, p = _arrays(labels, probabilities)
    order = np.argsort(p, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, y.size)):
        if chunk.size:
            out.append(
                {
                    "rows": int(chunk.size),
                    "mean_predicted": float(p[chunk].mean()),
                    "observed_rate": float(y[chunk].mean()),
                }
            )
    return out


def per_group(
    labels: Any, probabilities: Any, groups: Sequence[Any] | np.ndarray
) -> list[dict[str, Any]]:
    """Impressions, clicks, predicted clicks, calibration ratio and AUC of every group (e.g.
    placement), largest first. A group without clicks has ratio ``None``; a single-class group has
    AUC ``None``: per-group numbers are descriptive and must not fail the whole report."""
    y, p = _arrays(labels, probabilities)
    frame = pd.DataFrame({"group": np.asarray(groups).reshape(-1), "y": y, "p": p})
    out = []
    for group, rows in frame.groupby("group", sort=False):
        clicks = float(rows["y"].sum())
        predicted = float(rows["p"].sum())
        single = clicks in (0.0, float(len(rows)))
        out.append(
            {
                "group": str(group),
                "impressions": len(rows),
                "clicks": int(clicks),
                "predicted_clicks": predicted,
                "calibration_ratio": predicted / clicks if clicks else None,
                "auc": None if single else _auc(rows["y"].to_numpy(), rows["p"].to_numpy()),
            }
        )
    return sorted(out, key=lambda r: (-r["impressions"], r["group"]))


def ranking_metrics(
    labels: Any,
    probabilities: Any,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    truth: Any | None = None,
    bootstrap: int = 200,
    seed: int = 7,
) -> dict[str, Any]:
    """Every metric of one model on one evaluation set, as a JSON-ready dict.

    Args:
        labels: 0/1 clicks.
        probabilities: the model's calibrated probabilities.
        groups: per-row placement (or any grouping) for the per-group table.
        truth: per-row true click probability (simulated data only) for ``oracle_auc``.
        bootstrap: resamples of the AUC interval (0 = no interval).
        seed: seed of the resampling.

    Raises:
        EmptyEvaluationError: no rows.
        SingleClassError: all labels are equal.
    """
    y, p = _arrays(labels, probabilities)
    result: dict[str, Any] = {
        "rows": int(y.size),
        "clicks": int(y.sum()),
        "observed_ctr": float(y.mean()),
        "predicted_ctr": float(p.mean()),
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "normalized_entropy": normalized_entropy(y, p),
        "calibration_ratio": calibration_ratio(y, p),
        "calibration_ci95": list(calibration_interval(y, p)),
        "reliability": reliability(y, p),
    }
    if bootstrap:
        low, high = auc_interval(y, p, samples=bootstrap, seed=seed)
        result["auc_ci95"] = [low, high]
    if truth is not None:
        result["oracle_auc"] = auc(y, truth)
    if groups is not None:
        result["per_placement"] = per_group(y, p, groups)
    return result
