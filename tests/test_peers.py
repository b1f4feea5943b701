"""The ranker's peers on day D (issue 10, item 2), the intervals the gate reads (item 5), and the
LR baseline on a feature constant over the training rows (issue 11, item 1).

The planted features folder (tests/feature_folder.py) puts the click signal in a user-group ×
ad-category match and the slot position, none of it in the ad alone: the LR and GBDT peers learn
it, the ad's training CTR ranks at chance; the ad prior's formula is checked by hand on four rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from feature_folder import write_feature_folder

from models.evaluation.peers import (
    AD_PRIOR,
    GBDT,
    LOGISTIC,
    PeerError,
    fit_peers,
    fit_prior,
    inputs_frame,
    read_training_rows,
)
from models.evaluation.ranking import (
    auc,
    auc_difference_interval,
    calibration_interval,
    calibration_ratio,
    click_count_interval,
    proportion_interval,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_feature_folder(
        tmp_path_factory.mktemp("peers") / "features", impressions_per_day=6000, seed=5
    )


def test_peers_learn_what_the_planted_folder_lets_them_learn(folder) -> None:
    spec = folder.spec
    rows = read_training_rows(spec, max_rows=100_000)
    assert len(rows) == len(folder.table("training/ranking"))
    peers = fit_peers(spec, rows)
    assert list(peers.models) == [LOGISTIC, GBDT, AD_PRIOR]
    day = folder.table("eval")
    labels = day["label"].to_numpy()
    scores = peers.scores(day)
    aucs = {name: auc(labels, p) for name, p in scores.items()}
    assert aucs[LOGISTIC] > 0.57 and aucs[GBDT] > 0.55, aucs
    # every ad has the same expected CTR in the planted world (its clicks come from the
    # user-group match, shown regardless of category): the ad's history alone ranks at chance
    assert abs(aucs[AD_PRIOR] - 0.5) < 0.04, aucs
    for name, p in scores.items():  # fitted on the same distribution: calibrated roughly
        assert 0.75 < calibration_ratio(labels, p) < 1.33, (name, calibration_ratio(labels, p))


def test_training_rows_are_a_seeded_sample_when_capped(folder) -> None:
    first = read_training_rows(folder.spec, max_rows=500, seed=3)
    again = read_training_rows(folder.spec, max_rows=500, seed=3)
    assert len(first) == 500
    pd.testing.assert_frame_equal(first, again)


def test_the_ad_prior_is_the_smoothed_training_ctr() -> None:
    frame = pd.DataFrame({"ad_id": ["a", "a", "a", "b"]})
    labels = np.array([1, 1, 0, 0])  # global CTR 0.5
    prior = fit_prior(frame, labels, strength=2.0)
    # a: (2 + 2·0.5) / (3 + 2) = 0.6; b: (0 + 1) / (1 + 2) = 1/3; unseen: 0.5
    got = prior.predict(pd.DataFrame({"ad_id": ["a", "b", "new"]}))
    np.testing.assert_allclose(got, [0.6, 1 / 3, 0.5])


def test_peers_refuse_rows_with_one_class(folder) -> None:
    rows = read_training_rows(folder.spec, max_rows=1000)
    with pytest.raises(PeerError, match="all non-clicks"):
        fit_peers(folder.spec, rows.assign(label=0))
    with pytest.raises(PeerError, match="unknown peer"):
        fit_peers(folder.spec, rows, names=["forest"])


def test_a_peer_scores_a_serving_request_like_the_rows_it_came_from(folder) -> None:
    """The replay ranks with a peer through the serving path: its bytes-and-[1] request form
    must give the same probabilities as the evaluation rows."""
    spec = folder.spec
    peers = fit_peers(spec, read_training_rows(spec, 20_000), names=[LOGISTIC])
    day = folder.table("eval").head(1)
    shared = [f.name for f in spec.features if f.role in ("user", "context")]
    others = [f.name for f in spec.features if f.role == "ad"]

    def encode(values: pd.Series) -> np.ndarray:
        if values.dtype == object:
            return values.astype(str).to_numpy().astype("S")
        return values.to_numpy(dtype=np.float32)

    common = {n: encode(day[n]) for n in shared}
    candidates = {n: encode(day[n]) for n in others}
    frame = inputs_frame(common, candidates)
    np.testing.assert_allclose(
        peers.models[LOGISTIC].predict(frame), peers.models[LOGISTIC].predict(day), rtol=1e-5
    )


def test_the_lr_peers_looked_up_weights_score_as_its_one_hot_design(folder) -> None:
    """The LR peer scores by summing looked-up weights (the replay calls it once per request);
    that must be the fitted model's own ``predict_proba`` over the one-hot design, including
    values unseen in training, missing values and absent columns."""
    spec = folder.spec
    peer = fit_peers(spec, read_training_rows(spec, 20_000), names=[LOGISTIC]).models[LOGISTIC]
    day = folder.table("eval").head(300).copy()
    categorical = [f.name for f in spec.categorical]
    day.loc[day.index[::3], categorical[0]] = "never-seen-in-training"
    day.loc[day.index[1::5], categorical[1]] = None
    day.loc[day.index[2::7], categorical[2]] = ""
    day = day.drop(columns=[categorical[3]])
    expected = peer.model.predict_proba(peer.design(day))[:, 1]
    np.testing.assert_allclose(peer.predict(day), expected, rtol=0, atol=1e-9)
    assert np.ptp(expected) > 0.05  # the check compares scores that differ


# --------------------------------------------------------------------------- intervals


def test_click_count_interval_is_the_exact_poisson_interval() -> None:
    # Garwood 95% for 10 observed: 4.795 – 18.390 (standard tables)
    low, high = click_count_interval(10)
    assert low == pytest.approx(4.7954, abs=1e-3) and high == pytest.approx(18.3904, abs=1e-3)
    assert click_count_interval(0)[0] == 0.0


def test_calibration_interval_narrows_with_clicks() -> None:
    rng = np.random.default_rng(0)
    for n, width in ((2_000, 0.9), (200_000, 0.1)):
        p = np.full(n, 0.05)
        y = (rng.random(n) < p).astype(int)
        low, high = calibration_interval(y, p)
        assert low < calibration_ratio(y, p) < high
        assert low < 1.0 < high
        assert high - low < width


def test_paired_auc_difference_interval_sees_a_small_real_gain() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    signal = rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(signal - 2)))).astype(int)
    noise = rng.standard_normal(n)
    better, worse = signal + 0.5 * noise, signal + 0.7 * noise
    difference, low, high = auc_difference_interval(y, better, worse, samples=100)
    assert difference == pytest.approx(auc(y, better) - auc(y, worse))
    assert 0 < low < difference < high


def test_wilson_interval_of_a_proportion() -> None:
    low, high = proportion_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


# --------------------------------------------------------------------------- issue 11, item 1


def test_lr_baseline_survives_a_feature_constant_on_its_one_training_day(folder) -> None:
    """Regression: one training day makes history features constant (std 0); the baseline
    divided by it and LogisticRegression refused the NaN inputs."""
    from models.ranker.baselines import train_baseline

    spec = folder.spec
    constant = {f.name for f in spec.numeric}
    features = tuple(
        dataclasses.replace(f, std=0.0) if f.name in constant else f for f in spec.features
    )
    flat = dataclasses.replace(spec, features=features)
    rows = folder.table("training/ranking").head(3000)
    with np.errstate(divide="raise", invalid="raise"):
        baseline = train_baseline(flat, rows, rows, correction=0.0)
        p = baseline.predict(folder.table("eval").head(500))
    assert np.isfinite(p).all()
