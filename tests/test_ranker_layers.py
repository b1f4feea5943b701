"""The ranker's small pieces on tiny tensors with values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.feature_spec import standard_scale  # noqa: E402
from models.preprocessing import Standardize  # noqa: E402
from models.ranker.calibration import (  # noqa: E402
    CalibrationError,
    fit_calibration,
    platt_deviance_gain,
    sampling_correction,
)
from models.ranker.layers import (  # noqa: E402
    PROBABILITY_EPS,
    CalibrationHead,
    Cross,
    FactorizationMachine,
)
from models.ranker.similarity import EmbeddingSimilarity, lookup_rows  # noqa: E402


def test_cross_layer_is_x0_times_wx_plus_b_plus_x() -> None:
    layer = Cross()
    x0 = np.array([[1.0, 2.0]], dtype=np.float32)
    x = np.array([[3.0, -1.0]], dtype=np.float32)
    layer([x0, x])
    w = np.array([[1.0, 0.0], [2.0, 1.0]], dtype=np.float32)  # Keras Dense: x @ w
    b = np.array([0.5, -0.5], dtype=np.float32)
    layer._dense.set_weights([w, b])
    # x @ w = [3 - 2, 0 - 1] = [1, -1]; + b = [1.5, -1.5]; x0 * that = [1.5, -3]; + x = [4.5, -4]
    np.testing.assert_allclose(np.asarray(layer([x0, x])), [[4.5, -4.0]])


def test_low_rank_cross_keeps_the_shape() -> None:
    out = Cross(low_rank=1)([np.ones((3, 4), np.float32), np.ones((3, 4), np.float32)])
    assert tuple(out.shape) == (3, 4)


def test_factorization_machine_sums_pairwise_dot_products() -> None:
    fields = np.array([[[1.0, 2.0], [3.0, 0.0], [0.5, -1.0]]], dtype=np.float32)
    # pairs: (1,2)·(3,0)=3, (1,2)·(0.5,-1)=-1.5, (3,0)·(0.5,-1)=1.5 → 3
    np.testing.assert_allclose(np.asarray(FactorizationMachine()(fields)), [[3.0]])


class TestCalibrationHead:
    def test_platt_applies_correction_then_slope_and_intercept(self) -> None:
        head = CalibrationHead("platt", correction=math.log(0.5), slope=2.0, intercept=-1.0)
        z = 1.0 + math.log(0.5)
        expected = 1 / (1 + math.exp(-(2.0 * z - 1.0)))
        assert float(np.asarray(head(np.array([1.0], np.float32)))[0]) == pytest.approx(
            expected, rel=1e-5
        )

    def test_isotonic_interpolates_and_is_flat_outside_the_knots(self) -> None:
        head = CalibrationHead("isotonic", knots_x=[0.0, 1.0, 3.0], knots_y=[0.1, 0.3, 0.5])
        got = np.asarray(head(np.array([-5.0, 0.0, 0.5, 2.0, 3.0, 9.0], np.float32)))
        np.testing.assert_allclose(got, [0.1, 0.1, 0.2, 0.4, 0.5, 0.5], rtol=1e-6)

    def test_none_is_the_corrected_sigmoid_kept_off_0_and_1(self) -> None:
        head = CalibrationHead("none", correction=math.log(0.1))
        got = np.asarray(head(np.array([0.0, 80.0], np.float32)))
        assert got[0] == pytest.approx(0.1 / 1.1, rel=1e-5)  # odds 1 x 0.1
        assert got[1] == pytest.approx(1 - PROBABILITY_EPS)


class TestFitCalibration:
    def test_sampling_correction_is_log_rate(self) -> None:
        assert sampling_correction(0.25) == pytest.approx(math.log(0.25))
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sampling_correction(0.0)

    def test_correction_undoes_negative_downsampling(self) -> None:
        # A logistic model fitted on rows whose negatives were kept at 20 % predicts the odds of
        # the sampled data; adding log(0.2) to its logit gives back the full-traffic CTR.
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(2)
        x = rng.normal(0, 1, 200_000)
        y = rng.random(x.size) < 1 / (1 + np.exp(-(1.5 * x - 3.5)))
        keep = y | (rng.random(x.size) < 0.2)
        fitted = LogisticRegression().fit(x[keep, None], y[keep])
        logits = fitted.decision_function(x[:, None]).astype(np.float32)
        raw = np.asarray(CalibrationHead("none")(logits))
        corrected = np.asarray(CalibrationHead("none", correction=sampling_correction(0.2))(logits))
        assert raw.sum() / y.sum() > 2.5
        assert corrected.sum() / y.sum() == pytest.approx(1.0, abs=0.03)

    def test_platt_recovers_a_planted_slope_and_intercept(self) -> None:
        rng = np.random.default_rng(0)
        z = rng.normal(0, 2, 40_000)
        y = rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
        head = fit_calibration(z, y, "platt")
        assert head.slope == pytest.approx(0.5, abs=0.03)
        assert head.intercept == pytest.approx(-1.0, abs=0.05)

    def test_isotonic_is_monotone(self) -> None:
        rng = np.random.default_rng(1)
        z = rng.normal(0, 2, 5000)
        y = rng.random(z.size) < 1 / (1 + np.exp(-z))
        head = fit_calibration(z, y, "isotonic")
        assert np.all(np.diff(head.knots_y) >= 0)

    def test_platt_keeps_the_identity_when_few_held_out_clicks_cannot_tell(self) -> None:
        """Regression, issue 10: the demo's 2024-01-03 held out 1,975 rows with 64 clicks; Platt
        fitted on them moved the level +11% and the ranker was refused on D at 1.163. Here the
        network's logits are the true ones, so any fitted map is noise."""
        rng = np.random.default_rng(3)
        z = rng.normal(-3.5, 0.8, 2000)
        y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
        free = fit_calibration(z, y, "platt")
        assert (free.slope, free.intercept) != pytest.approx((1.0, 0.0), abs=0.05)
        assert platt_deviance_gain(z, y, free.slope, free.intercept) < 5.99  # χ²₂ at 0.05
        tested = fit_calibration(z, y, "platt", significance=0.05)
        assert (tested.slope, tested.intercept) == (1.0, 0.0)

    def test_platt_is_applied_when_the_held_out_rows_show_a_real_offset(self) -> None:
        # The network predicts e^0.5 = 1.65x the odds of a click: 20,000 rows show it for sure.
        rng = np.random.default_rng(4)
        truth = rng.normal(-3.5, 0.8, 20_000)
        y = (rng.random(truth.size) < 1 / (1 + np.exp(-truth))).astype(int)
        head = fit_calibration(truth + 0.5, y, "platt", significance=0.05)
        assert head.slope == pytest.approx(1.0, abs=0.1)
        assert head.intercept + head.slope * 0.5 == pytest.approx(0.0, abs=0.15)

    def test_the_identity_gains_no_deviance(self) -> None:
        z, y = np.array([-1.0, 0.0, 2.0]), np.array([0, 1, 1])
        assert platt_deviance_gain(z, y, 1.0, 0.0) == 0.0

    def test_single_class_rows_cannot_be_calibrated(self) -> None:
        with pytest.raises(CalibrationError, match="all non-clicks"):
            fit_calibration(np.zeros(5), np.zeros(5), "platt")


def test_standardize_logs_standardises_and_fills_nan_with_default() -> None:
    stats = [
        {"name": "price", "mean": 1.0, "std": 2.0, "log1p": True, "default": math.e - 1},
        {"name": "ctr", "mean": 0.1, "std": 0.1, "log1p": False, "default": 0.1},
    ]
    price = np.array([math.e**3 - 1, np.nan, -4.0], np.float32)  # log1p → 3; NaN → default; <0 → 0
    ctr = np.array([0.3, 0.1, np.nan], np.float32)
    got = np.asarray(Standardize(stats)([price, ctr]))
    np.testing.assert_allclose(got, [[1.0, 2.0], [0.0, 0.0], [-0.5, 0.0]], atol=1e-5)


def test_a_feature_constant_in_training_stays_at_zero() -> None:
    """History counts are all zero on the first day of data: whatever they are at serving, the
    network must see what it saw in training (its weights for them were never trained)."""
    stats = [{"name": "hist", "mean": 0.0, "std": 0.0, "log1p": True, "default": 0.0}]
    got = np.asarray(Standardize(stats)([np.array([0.0, 250.0, 1e6], np.float32)]))
    np.testing.assert_array_equal(got, [[0.0], [0.0], [0.0]])
    assert standard_scale(0.0) == 0.0 and standard_scale(1e-18, mean=0.05) == 0.0
    assert standard_scale(None) == 1.0 and standard_scale(0.5) == 2.0


class _Table:
    def __init__(self, ids: list[str], vectors: list[list[float]]) -> None:
        order = np.argsort(ids)
        self.ids = np.array([ids[i].encode() for i in order], dtype="S3")
        self.vectors = np.asarray(vectors, np.float32)[order]


class _Embeddings:
    version = "20240103"
    dim = 2

    def __init__(self) -> None:
        self.users = _Table(["u1", "u2"], [[1, 0], [0, 1]])
        self.placements = _Table(["p1"], [[1, 1]])
        self.ads = _Table(["a1", "a2"], [[2, 0], [0, 3]])
        self.fallback_user = np.array([0.5, 0.5], np.float32)
        self.fallback_placement = np.array([0.0, 0.0], np.float32)


def test_embedding_similarity_scores_dot_products_with_fallbacks() -> None:
    provider = EmbeddingSimilarity(_Embeddings())
    users = np.array(["u1", "u2", "unknown-and-too-long", "u1"], dtype=object)
    places = np.array(["p1", "p1", "p1", "p9"], dtype=object)
    ads = np.array(["a1", "a2", "a2", "a9"], dtype=object)
    user_ad, context_ad = provider.scores(users, places, ads)
    np.testing.assert_allclose(user_ad, [2.0, 3.0, 1.5, 0.0])  # fallback user; unknown ad → 0
    np.testing.assert_allclose(context_ad, [2.0, 3.0, 3.0, 0.0])
    assert provider.version == "20240103"
    assert lookup_rows(provider._embeddings.users, np.array(["u2", "", "u3"])).tolist() == [
        1,
        -1,
        -1,
    ]
