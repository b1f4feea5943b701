"""Fitting the calibration head on held-out rows.

Ranking only needs the order of the scores, but the ads auction multiplies ``pctr`` by the bid, so
the probabilities themselves must be right on average (DESIGN.md targets predicted / observed clicks
within 0.95–1.05). A network trained with log loss is roughly calibrated on its training
distribution; negative down-sampling, over-fitting and the drift to a later day are not. This
module fits the correction on rows the network never trained on (the last training day), and returns
a :class:`~models.ranker.layers.CalibrationHead` that becomes part of the exported model.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from deepclick.errors import DeepclickError
from models.ranker.layers import PROBABILITY_EPS, CalibrationHead


class CalibrationError(DeepclickError, ValueError):
    """The held-out rows cannot fit a calibration (e.g. they hold one class only)."""


def sampling_correction(rate: float) -> float:
    """The logit shift that undoes keeping negatives at ``rate``: ``log(rate)``.

    Keeping a share ``r`` of negatives multiplies the training odds of a click by ``1/r``; adding
    ``log r`` to the logit divides them back, so ``sigmoid(logit + log r)`` estimates the click
    probability on the full traffic.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"negative sampling rate must be in (0, 1], got {rate}")
    return math.log(rate)


def _log_likelihood(z: np.ndarray, y: np.ndarray, slope: float, intercept: float) -> float:
    t = slope * z + intercept
    return float(np.sum(y * t - np.logaddexp(0.0, t)))


def platt_deviance_gain(z: np.ndarray, y: np.ndarray, slope: float, intercept: float) -> float:
    """Twice the log-likelihood the fitted Platt map gains over the identity on the held-out
    rows: the likelihood-ratio statistic of "the network's own probabilities are calibrated",
    χ² with 2 degrees of freedom when they are."""
    return 2.0 * (_log_likelihood(z, y, slope, intercept) - _log_likelihood(z, y, 1.0, 0.0))


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    method: str,
    *,
    correction: float = 0.0,
    significance: float | None = None,
) -> CalibrationHead:
    """Fit ``method`` (``platt``, ``isotonic`` or ``none``) on the corrected held-out logits.

    Args:
        logits: the network's raw logits on the held-out rows.
        labels: their 0/1 labels.
        method: the calibration kind (settings ``ranker.calibration``).
        correction: the negative-sampling correction, applied before the fitted map.
        significance: ``platt`` only: keep the identity map (slope 1, intercept 0) unless the
            fitted map beats it by a likelihood-ratio test at this level. Why: with one training
            day the head is fitted on a tenth of it; on the demo's 2024-01-03 that was 64 clicks,
            on which Platt moved the level +11% (deviance gain 5.6, below χ²₂ 5.99) and took the
            ranker from 1.047 to 1.163 predicted/observed clicks on D (issue 10). ``None``: always
            apply the fit.

    Raises:
        CalibrationError: ``platt``/``isotonic`` on rows with a single class: nothing to fit.
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1) + correction
    y = np.asarray(labels).reshape(-1).astype(int)
    if z.shape != y.shape or z.size == 0:
        raise CalibrationError(
            f"calibration needs matching, non-empty logits and labels: {z.shape} vs {y.shape}"
        )
    if method == "none":
        return CalibrationHead("none", correction=correction, name="calibration")
    if np.unique(y).size < 2:
        raise CalibrationError(
            f"cannot fit {method} calibration: the {y.size} held-out rows are all "
            f"{'clicks' if y[0] else 'non-clicks'}; use more training days or calibration 'none'"
        )
    if method == "platt":
        fitted = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), y)
        slope, intercept = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
        if significance is not None and platt_deviance_gain(z, y, slope, intercept) < chi2.ppf(
            1.0 - significance, df=2
        ):
            slope, intercept = 1.0, 0.0
        return CalibrationHead(
            "platt", correction=correction, slope=slope, intercept=intercept, name="calibration"
        )
    if method == "isotonic":
        fitted = IsotonicRegression(
            y_min=PROBABILITY_EPS, y_max=1 - PROBABILITY_EPS, out_of_bounds="clip"
        ).fit(z, y)
        return CalibrationHead(
            "isotonic",
            correction=correction,
            knots_x=fitted.X_thresholds_.tolist(),
            knots_y=fitted.y_thresholds_.tolist(),
            name="calibration",
        )
    raise CalibrationError(f"calibration method {method!r}: use platt, isotonic or none")
