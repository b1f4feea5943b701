"""Offline ranking metrics against values computed by hand on tiny sets (no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation.ranking import (
    EmptyEvaluationError,
    SingleClassError,
    _bootstrap,
    _ScoreOrder,
    auc,
    auc_difference_interval,
    auc_interval,
    calibration_ratio,
    entropy,
    logloss,
    normalized_entropy,
    per_group,
    ranking_metrics,
    reliability,
)


class TestAuc:
    def test_counts_ordered_pairs(self) -> None:
        # clicks score 0.35 and 0.8; non-clicks 0.1 and 0.4. Of the 4 (click, non-click) pairs,
        # 3 are ordered correctly (0.35 < 0.4 is the miss): AUC = 3/4.
        assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)

    def test_ties_count_half(self) -> None:
        assert auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)

    def test_perfect_and_reversed(self) -> None:
        assert auc([0, 1], [0.1, 0.9]) == 1.0
        assert auc([0, 1], [0.9, 0.1]) == 0.0

    def test_single_class_names_the_problem(self) -> None:
        with pytest.raises(SingleClassError, match="AUC is undefined: all 3 rows are non-clicks"):
            auc([0, 0, 0], [0.1, 0.2, 0.3])

    def test_empty_is_an_evaluation_error(self) -> None:
        with pytest.raises(EmptyEvaluationError, match="no rows"):
            auc([], [])

    def test_bootstrap_interval_is_seeded_and_brackets_the_estimate(self) -> None:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 400)
        p = np.clip(0.5 * y + rng.normal(0.25, 0.3, 400), 0, 1)
        low, high = auc_interval(y, p, samples=100, seed=3)
        assert low < auc(y, p) < high
        assert (low, high) == auc_interval(y, p, samples=100, seed=3)
        assert high - low < 0.15

    def test_bootstrap_resamples_score_as_the_resampled_rows_would(self) -> None:
        # The intervals weight each row by how often a resample drew it instead of sorting the
        # resample again; with ties (rounded scores), rows drawn twice and rows never drawn,
        # that must be the AUC of the resampled rows themselves, and so the same interval.
        rng = np.random.default_rng(5)
        y = rng.integers(0, 2, 300).astype(float)
        p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.3, 300), 0, 1), 1)
        q = np.round(rng.uniform(size=300), 2)
        ordered = _ScoreOrder.of(y, p)
        for _ in range(20):
            idx = rng.integers(0, y.size, y.size)
            weights = np.bincount(idx, minlength=y.size).astype(float)
            assert ordered.auc(weights) == pytest.approx(auc(y[idx], p[idx]), abs=1e-12)
        by_sorting = _bootstrap(y, lambda idx: auc(y[idx], p[idx]), 50, 0.95, 3)
        assert auc_interval(y, p, samples=50, seed=3) == pytest.approx(by_sorting, abs=1e-12)
        paired = _bootstrap(y, lambda idx: auc(y[idx], p[idx]) - auc(y[idx], q[idx]), 50, 0.95, 3)
        difference, low, high = auc_difference_interval(y, p, q, samples=50, seed=3)
        assert difference == pytest.approx(auc(y, p) - auc(y, q))
        assert (low, high) == pytest.approx(paired, abs=1e-12)


class TestLogLossAndEntropy:
    def test_logloss_by_hand(self) -> None:
        expected = -(math.log(0.8) + math.log(0.6)) / 2
        assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)

    def test_logloss_clips_certain_mistakes(self) -> None:
        assert math.isfinite(logloss([1], [0.0]))

    def test_normalized_entropy_divides_by_base_rate_entropy(self) -> None:
        # base rate 1/2: entropy ln 2; predicting 0.5 everywhere gives NE exactly 1.
        assert entropy(0.5) == pytest.approx(math.log(2))
        assert normalized_entropy([1, 0], [0.5, 0.5]) == pytest.approx(1.0)
        expected = (-(math.log(0.8) + math.log(0.6)) / 2) / math.log(2)
        assert normalized_entropy([1, 0], [0.8, 0.4]) == pytest.approx(expected)

    def test_normalized_entropy_needs_both_classes(self) -> None:
        with pytest.raises(SingleClassError, match="normalized entropy is undefined"):
            normalized_entropy([1, 1], [0.5, 0.5])


class TestCalibration:
    def test_ratio_is_predicted_over_observed_clicks(self) -> None:
        assert calibration_ratio([0, 1, 0, 1], [0.2, 0.3, 0.5, 0.4]) == pytest.approx(1.4 / 2)

    def test_ratio_without_clicks_is_an_error(self) -> None:
        with pytest.raises(SingleClassError, match="calibration ratio is undefined"):
            calibration_ratio([0, 0], [0.1, 0.1])

    def test_per_group_by_hand(self) -> None:
        rows = per_group([1, 0, 0, 0, 1], [0.6, 0.2, 0.1, 0.3, 0.5], ["a", "a", "b", "b", "a"])
        assert [r["group"] for r in rows] == ["a", "b"]  # largest first
        a, b = rows
        assert a["impressions"] == 3 and a["clicks"] == 2
        assert a["predicted_clicks"] == pytest.approx(1.3)
        assert a["calibration_ratio"] == pytest.approx(0.65)
        assert a["auc"] == pytest.approx(1.0)
        assert b["calibration_ratio"] is None and b["auc"] is None  # no clicks: descriptive only

    def test_reliability_bins_by_quantile(self) -> None:
        points = reliability([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], bins=2)
        assert points == [
            {"rows": 2, "mean_predicted": pytest.approx(0.15), "observed_rate": 0.0},
            {"rows": 2, "mean_predicted": pytest.approx(0.8), "observed_rate": 1.0},
        ]


def test_ranking_metrics_gathers_everything_including_oracle() -> None:
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    truth = [0.1, 0.2, 0.6, 0.7]  # the true probabilities order the pairs perfectly
    result = ranking_metrics(y, p, groups=["x", "x", "y", "y"], truth=truth, bootstrap=50)
    assert result["auc"] == pytest.approx(0.75)
    assert result["oracle_auc"] == pytest.approx(1.0)
    assert result["calibration_ratio"] == pytest.approx(1.65 / 2)
    assert result["rows"] == 4 and result["clicks"] == 2
    assert len(result["auc_ci95"]) == 2
    assert {r["group"] for r in result["per_placement"]} == {"x", "y"}
