"""The logistic-regression baseline the ranker must beat (DESIGN.md: AUC ≥ LR + 0.01).

Logistic regression on hashed ``feature=value`` indicators plus the standardised numeric features
is the classic CTR model: it learns one weight per value and no interaction, so the gap between it
and the ranker measures what the embeddings and crosses add. It is trained on exactly the rows the
ranker trains on (same split, same negative sampling and correction) and calibrated with Platt
scaling on the same held-out rows, so the comparison is about the model, not the data.

Hashing (not a vocabulary) keeps the baseline independent of the vocab files: values unseen in
training share buckets with others, as a production hashed LR would do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from models.feature_spec import FeatureSpec, NumericStats
from models.ranker.calibration import fit_calibration
from models.ranker.inputs import frame_to_inputs
from models.ranker.layers import CalibrationHead


def hashed_design(spec: FeatureSpec, frame: pd.DataFrame, bits: int) -> sp.csr_matrix:
    """Rows of ``frame`` as a sparse matrix: ``2**bits`` hashed indicator columns (one per
    ``name=value``, hashed with pandas' fixed-key SipHash, so the same on every run) followed by one
    column per numeric feature, standardised as the ranker does."""
    inputs = frame_to_inputs(spec, frame)
    n = len(frame)
    width = 1 << bits
    rows, cols = [], []
    for feature in spec.categorical:
        tokens = pd.Series(inputs[feature.name], dtype=object).radd(f"{feature.name}\x1f")
        hashed = pd.util.hash_array(tokens.to_numpy(dtype=object)) % np.uint64(width)
        rows.append(np.arange(n))
        cols.append(hashed.astype(np.int64))
    indicators = (
        sp.csr_matrix(
            (
                np.ones(n * len(cols), dtype=np.float32),
                (np.concatenate(rows), np.concatenate(cols)),
            ),
            shape=(n, width),
        )
        if cols
        else sp.csr_matrix((n, width), dtype=np.float32)
    )
    # standardised as the ranker's graph does (a feature constant in training → 0, issue 11)
    numeric = [NumericStats.of(f).standardize(inputs[f.name]) for f in spec.numeric]
    dense = sp.csr_matrix(np.stack(numeric, axis=1)) if numeric else sp.csr_matrix((n, 0))
    return sp.hstack([indicators, dense], format="csr")


@dataclass
class LogisticBaseline:
    """A fitted hashed logistic regression with its sampling correction and Platt calibration."""

    spec: FeatureSpec
    bits: int
    model: LogisticRegression
    calibration: CalibrationHead

    def logits(self, frame: pd.DataFrame) -> np.ndarray:
        """Uncorrected log-odds (what the regression learned on the sampled rows)."""
        return self.model.decision_function(hashed_design(self.spec, frame, self.bits))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated click probabilities for the rows of ``frame``."""
        return np.asarray(self.calibration(self.logits(frame).astype(np.float32)))


def train_baseline(
    spec: FeatureSpec,
    fit_rows: pd.DataFrame,
    calibration_rows: pd.DataFrame,
    *,
    correction: float,
    bits: int = 18,
    seed: int = 7,
) -> LogisticBaseline:
    """Fit the regression on ``fit_rows`` and Platt-calibrate it on ``calibration_rows``.

    Args:
        spec: the feature spec (which columns, how to standardise).
        fit_rows: training rows, negatives possibly down-sampled.
        calibration_rows: held-out rows, not down-sampled.
        correction: ``log(rate)`` of the down-sampling, added to the logits before calibrating.
        bits: hash space of the indicators.
        seed: for the solver's tie-breaking.
    """
    design = hashed_design(spec, fit_rows, bits)
    labels = fit_rows[spec.label].to_numpy().astype(int)
    # saga: linear time in the non-zeros, seconds where lbfgs/liblinear take tens on 2**18 columns;
    # a loose tolerance is enough for a baseline and its convergence warning is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(
            C=1.0, solver="saga", max_iter=50, tol=1e-3, random_state=seed
        ).fit(design, labels)
    held_out = model.decision_function(hashed_design(spec, calibration_rows, bits))
    head = fit_calibration(
        held_out, calibration_rows[spec.label].to_numpy(), "platt", correction=correction
    )
    return LogisticBaseline(spec, bits, model, head)
