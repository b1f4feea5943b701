"""The ranker's wide (first-order) part, issue 10: on data where per-id click biases dominate, a
one-hot logistic regression beat the DCN-v2 ranker because a few Adam epochs barely move the
embeddings of ids seen a handful of times. The wide part, solved first as that very regression,
puts the ranker level with it before the network adds anything.

Planted folder (tests/feature_folder.py): every user and every ad has its own click-logit bias
(std 1.0), no group × category match, 1,000 users and 200 ads, so each user appears ~4 times a
day: the regime of the demo's users.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from feature_folder import FeatureFolder, write_feature_folder
from sklearn.linear_model import LogisticRegression

from deepclick.settings import RankerSettings
from models.evaluation.peers import PeerColumns, fit_logistic
from models.evaluation.ranking import auc, logloss
from models.ranker.inputs import frame_to_inputs
from models.ranker.model import build_logit_model
from models.ranker.train import _tensors, predict, train_ranker
from models.ranker.wide import (
    average_day_constant,
    average_unseen,
    feature_column_scale,
    fit_wide,
    random_effects,
    random_slopes,
    refit_feature_weights,
    served_means,
    slopes_log_evidence,
    solve_wide,
    walk_c_grid,
    wide_design,
    wide_layers,
)

SETTINGS = RankerSettings(
    batch_size=256, epochs=2, cross_layers=1, dropout=0.3, baseline=False, fm_blend=0.0
)
"""The wide part and the network alone: the window FM blended after them (``fm_blend``) has
its own tests (tests/test_ranker_fm.py)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("id_bias"),
        users=1000,
        ads=200,
        impressions_per_day=4000,
        base_logit=-2.0,
        match_strength=0.0,
        id_bias_std=1.0,
        seed=0,
    )


def test_wide_fit_writes_the_logistic_regression_into_the_network(folder: FeatureFolder) -> None:
    """Right after the wide fit (before any epoch) the network's logit is exactly the regression's
    decision function: weights per vocabulary index, numbers, intercept; the deep part adds 0."""
    rows = folder.table("training/ranking")
    labels = rows["label"].to_numpy()
    model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
    tensors = _tensors(model, frame_to_inputs(folder.spec, rows))
    fit_wide(model, tensors, labels, c=0.1, seed=7)
    design = wide_design(model, tensors)
    reference = LogisticRegression(C=0.1, max_iter=500).fit(design, labels)
    np.testing.assert_allclose(
        predict(model, tensors), reference.decision_function(design), atol=2e-3
    )
    assert not any(layer.trainable for layer in model.layers if layer.name.startswith("wide__"))


def test_wide_part_matches_the_one_hot_lr_where_embeddings_alone_fall_behind(
    folder: FeatureFolder,
) -> None:
    eval_rows = folder.table("eval")
    labels = eval_rows["label"].to_numpy()
    scores = {}
    for name, update in (("deep only", {"wide": False}), ("wide and deep", {})):
        trained = train_ranker(folder.spec, SETTINGS.model_copy(update=update), progress=False)
        scores[name] = auc(labels, trained.predict(eval_rows))
    fit = trained.split.fit  # the same rows both rankers trained on
    peer = fit_logistic(PeerColumns.of(folder.spec), fit, fit["label"].to_numpy())
    scores["one-hot LR"] = auc(labels, peer.predict(eval_rows))
    # measured: deep only 0.762, wide and deep 0.774, LR 0.774 (oracle 0.830)
    assert scores["wide and deep"] >= scores["one-hot LR"] - 0.005, scores
    assert scores["deep only"] < scores["one-hot LR"] - 0.005, scores


def test_a_value_absent_from_the_fit_rows_gets_the_average_weight_not_zero() -> None:
    """Guards the medium world's 1.358 calibration: D's day of week had no fit row, and its
    weight 0 was not neutral because L2 had moved part of the intercept into the seen values."""
    weights = np.array([0.0, 0.5, -0.3, 0.0], dtype=np.float32)  # OOV, seen x3, seen x1, unseen
    rows = np.array([0, 3, 1, 0])
    got = average_unseen(weights, rows)
    expected = (3 * 0.5 + 1 * -0.3) / 4  # 0.3
    np.testing.assert_allclose(got, [expected, 0.5, -0.3, expected], rtol=1e-6)
    np.testing.assert_array_equal(average_unseen(weights, np.ones(4)), weights)  # all seen


def test_an_unseen_day_of_week_keeps_the_rankers_level(folder: FeatureFolder) -> None:
    """Planted: the fit rows carry ctx__dow '1' or '2' only (half each), the scored rows day '0'
    (in the vocabulary, never in the fit): its logit is the mean of the same rows as '1' and '2',
    although the seen days carry clearly nonzero weights (L2's share of the intercept)."""
    rows = folder.table("training/ranking").copy()
    rows["ctx__dow"] = np.where(np.arange(len(rows)) % 2 == 0, "1", "2")
    labels = rows["label"].to_numpy()
    model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
    fit_wide(model, _tensors(model, frame_to_inputs(folder.spec, rows)), labels, c=0.1, seed=7)
    assert np.abs(model.get_layer("wide__ctx__dow").get_weights()[0]).max() > 0.01
    scored = rows.head(500)
    logits = {
        day: predict(
            model, _tensors(model, frame_to_inputs(folder.spec, scored.assign(ctx__dow=day)))
        )
        for day in ("0", "1", "2")
    }
    np.testing.assert_allclose(logits["0"], (logits["1"] + logits["2"]) / 2, atol=1e-4)


def test_a_weekday_seen_on_one_day_only_gets_the_mean_weight() -> None:
    """Regression, issue 10 (medium world, D a Monday): the only Monday of the wide part's days
    was the log's first day, and its weight, that day's intercept, over-predicted D by 42%."""
    weights = np.array([0.0, 0.3, -0.1, 0.9])
    index = np.array([1, 1, 2, 2, 1, 2, 3])  # value 1 on days A and C, 2 on B and D, 3 on E only
    dates = np.array(["A", "A", "B", "B", "C", "D", "E"])
    got = average_day_constant(weights, index, dates, min_days=2)
    # trusted values 1 and 2, three rows each: mean (0.3·3 − 0.1·3) / 6 = 0.1
    np.testing.assert_allclose(got, [0.1, 0.3, -0.1, 0.1])
    np.testing.assert_array_equal(average_day_constant(weights, index, dates, 0), weights)


def test_a_feature_that_varies_within_a_day_keeps_its_weights() -> None:
    weights = np.array([0.0, 0.3, -0.1])
    got = average_day_constant(weights, np.array([1, 2]), np.array(["A", "A"]), min_days=2)
    np.testing.assert_array_equal(got, weights)


def test_the_wide_strength_is_chosen_by_held_out_log_loss_and_its_solution_is_the_one_kept(
    folder: FeatureFolder,
) -> None:
    """``c_grid``: one wide fit per C, the lowest held-out log loss wins, and the network holds
    exactly the winner's weights (the same as fitting that C alone). Planted per-id biases: a C
    so small that every id weight is nearly 0 must lose to 0.1."""
    rows = folder.table("training/ranking")
    fit, held = rows.iloc[: len(rows) * 3 // 4], rows.iloc[len(rows) * 3 // 4 :]
    labels, held_labels = fit["label"].to_numpy(), held["label"].to_numpy()

    def model_and_tensors():
        model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
        return (
            model,
            _tensors(model, frame_to_inputs(folder.spec, fit)),
            _tensors(model, frame_to_inputs(folder.spec, held)),
        )

    model, tensors, held_tensors = model_and_tensors()
    chosen = fit_wide(model, tensors, labels, c=1.0, seed=7, c_grid=[1e-4, 0.1],
                      held=(held_tensors, held_labels, 0.0))  # fmt: skip
    losses = {c: chosen[f"wide_holdout_logloss_c{c:g}"] for c in (1e-4, 0.1)}
    assert chosen["wide_c"] == 0.1 and losses[0.1] < losses[1e-4], losses
    alone, alone_tensors, _ = model_and_tensors()
    fit_wide(alone, alone_tensors, labels, c=0.1, seed=7)
    np.testing.assert_allclose(predict(model, held_tensors), predict(alone, _tensors(
        alone, frame_to_inputs(folder.spec, held))), atol=1e-5)  # fmt: skip
    # the reported loss is the wide part's own, on the held-out rows, as the network computes it
    p = 1.0 / (1.0 + np.exp(-predict(model, held_tensors)))
    expected = -np.mean(held_labels * np.log(p) + (1 - held_labels) * np.log(1 - p))
    assert abs(losses[0.1] - expected) < 1e-4


def _one_hot(values: np.ndarray, size: int) -> sp.csr_matrix:
    n = len(values)
    return sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), values)), shape=(n, size))


def test_the_c_grid_stops_once_the_held_out_loss_rises_and_threads_keep_the_choice() -> None:
    """``walk_c_grid``: from the strongest L2, one solve at a time, the walk stops at the first
    ``C`` whose held-out loss is above the best so far (the weaker ones are the slow solves);
    none of the values left out would have won. Two solves side by side choose the very same
    weights. Planted: 400 ids with logit effects of std 0.7, 15 rows each, so weak L2 overfits."""
    rng = np.random.default_rng(3)
    n, k = 6000, 400
    ad = rng.integers(0, k, 2 * n)
    effect = rng.normal(0, 0.7, k)
    labels = (rng.random(2 * n) < 1 / (1 + np.exp(-(effect[ad] - 2)))).astype(int)
    fit, held = _one_hot(ad[:n], k), _one_hot(ad[n:], k)
    grid = [1e4, 1e-4, 1e-2, 1.0, 100.0]  # the walk sorts it

    def held_loss(solution) -> float:
        return logloss(labels[n:], 1 / (1 + np.exp(-solution.logits(held))))

    def walked(threads: int):
        solved: list[float] = []

        def solve(c: float):
            solved.append(c)
            return solve_wide(fit, [k], labels[:n], c=c, seed=7)

        losses, best = walk_c_grid(solve, held_loss, grid, threads=threads)
        return sorted(solved), losses, best

    solved, losses, best = walked(threads=1)
    assert solved == [1e-4, 1e-2, 1.0, 100.0] == list(losses)  # 100 rose past 1.0: stop
    assert best.c == 1.0 == min(losses, key=losses.__getitem__)
    left_out = held_loss(solve_wide(fit, [k], labels[:n], c=1e4, seed=7))
    assert left_out > losses[1.0]
    side_by_side, pair_losses, pair_best = walked(threads=2)
    assert side_by_side == [1e-4, 1e-2, 1.0, 100.0]  # waves (1e-4, 1e-2), (1.0, 100): stop
    assert pair_losses == losses and pair_best.c == best.c
    for a, b in zip(pair_best.blocks, best.blocks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_served_means_are_the_per_table_rules_worked_out_once() -> None:
    """``served_means`` on a design of three tables: a day-constant feature (its value seen on
    one day only and its unseen value get the trusted values' mean), a feature varying within
    days (only its unseen value gets the mean), and numbers after them (left alone)."""
    dates = np.array(["d1", "d1", "d2", "d2", "d3", "d3"], dtype=object)
    dow = np.array([1, 1, 2, 2, 1, 1])  # value 1 on days d1 and d3, 2 on d2 only, 0 never
    user = np.array([0, 1, 0, 2, 1, 0])  # value 3 never
    design = sp.hstack(
        [_one_hot(dow, 3), _one_hot(user, 4), sp.csr_matrix(np.arange(6.0).reshape(-1, 1))],
        format="csr",
    )
    served = served_means(design, [3, 4], dates, day_feature_min_days=2)
    dow_weights, user_weights = np.array([0.5, 0.2, -0.4]), np.array([0.3, -0.1, 0.6, 9.0])
    np.testing.assert_allclose(served[0].apply(dow_weights), [0.2, 0.2, 0.2])
    np.testing.assert_allclose(
        served[0].apply(dow_weights), average_day_constant(dow_weights, dow, dates, 2)
    )
    np.testing.assert_allclose(
        served[1].apply(user_weights), average_unseen(user_weights, np.bincount(user, minlength=4))
    )
    assert served[1].apply(user_weights)[3] == pytest.approx((0.3 * 3 - 0.1 * 2 + 0.6) / 6)
    unseen_only = served_means(design, [3, 4])  # without dates: the unseen rule alone
    np.testing.assert_allclose(unseen_only[0].apply(dow_weights)[1:], dow_weights[1:])
    # With sampled negatives each fit row counts as the log has it (rows 2 and 3 are negatives
    # kept at rate 1/4), as the window FM counts them: user values 0, 1, 2 weigh 6, 2 and 4.
    weighted = served_means(design, [3, 4], row_weights=np.array([1.0, 1, 4, 4, 1, 1]))
    assert weighted[1].apply(user_weights)[3] == pytest.approx((0.3 * 6 - 0.1 * 2 + 0.6 * 4) / 12)


def test_a_column_scale_is_the_l2_prior_of_those_columns() -> None:
    """Scaling every column by s fits the same model as C·s² (the penalty is on the fitted
    weights, the returned ones are s times them): the identity ``wide_prior_scale`` rests on."""
    rng = np.random.default_rng(0)
    n, k = 3000, 40
    column = rng.integers(0, k, n)
    design = sp.csr_matrix((np.ones(n), (np.arange(n), column)), shape=(n, k))
    labels = (rng.random(n) < 1 / (1 + np.exp(-(rng.normal(0, 1, k)[column] - 1)))).astype(int)
    scaled = solve_wide(design, [k], labels, c=0.05, seed=7, column_scale=np.full(k, 2.0))
    wider = solve_wide(design, [k], labels, c=0.2, seed=7)
    # equal up to L-BFGS's stopping tolerance
    np.testing.assert_allclose(scaled.logits(design), wider.logits(design), atol=1e-2)
    plain = solve_wide(design, [k], labels, c=0.05, seed=7)
    assert np.std(scaled.blocks[0]) > 1.2 * np.std(plain.blocks[0])


def test_a_prior_scale_widens_only_the_named_features_weights(folder: FeatureFolder) -> None:
    """``prior_scale={"ad_id": 3}``: the ad ids' wide weights are the regression's on the design
    with their columns tripled (then tripled back), every other table keeps the shared prior; a
    name the spec lacks changes nothing."""
    rows = folder.table("training/ranking")
    labels = rows["label"].to_numpy()

    def fitted(prior_scale: dict[str, float]):
        model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
        tensors = _tensors(model, frame_to_inputs(folder.spec, rows))
        fit_wide(model, tensors, labels, c=0.1, seed=7, prior_scale=prior_scale)
        return model, tensors

    model, tensors = fitted({"ad_id": 3.0})
    tables, _ = wide_layers(model)
    scale = feature_column_scale(tables, wide_design(model, tensors).shape[1], {"ad_id": 3.0})
    assert scale is not None and set(np.unique(scale)) == {1.0, 3.0}
    design = wide_design(model, tensors)
    reference = LogisticRegression(C=0.1, max_iter=500).fit(design @ sp.diags(scale), labels)
    np.testing.assert_allclose(
        predict(model, tensors), reference.decision_function(design @ sp.diags(scale)), atol=2e-3
    )
    plain, plain_tensors = fitted({})
    unknown, _ = fitted({"no_such_feature": 3.0})
    np.testing.assert_allclose(predict(unknown, plain_tensors), predict(plain, plain_tensors))
    ad = model.get_layer("wide__ad_id").get_weights()[0]
    ad_plain = plain.get_layer("wide__ad_id").get_weights()[0]
    assert np.std(ad) > 1.5 * np.std(ad_plain)


def test_a_refit_moves_only_the_named_tables_seen_values_to_their_posterior_mode() -> None:
    """``refit_feature_weights``: every weight but the named table's stays; its seen values land
    where the log posterior's gradient is zero (Gaussian prior of the given variance, the solved
    logit as offset); a value with no rows keeps its weight."""
    rng = np.random.default_rng(1)
    n, k, other = 4000, 30, 5
    ad = rng.integers(0, k - 1, n)  # the last value never occurs
    group = rng.integers(0, other, n)
    design = sp.hstack(
        [
            sp.csr_matrix((np.ones(n), (np.arange(n), ad)), shape=(n, k)),
            sp.csr_matrix((np.ones(n), (np.arange(n), group)), shape=(n, other)),
        ],
        format="csr",
    )
    true_effect = rng.normal(0, 0.7, k)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(true_effect[ad] - 2)))).astype(int)
    solved = solve_wide(design, [k, other], labels, c=0.001, seed=7)  # ids shrunk to ~0
    refit = refit_feature_weights(solved, design, [k, other], labels, {0: 0.5})
    np.testing.assert_array_equal(refit.blocks[1], solved.blocks[1])
    assert refit.intercept == solved.intercept
    assert refit.blocks[0][k - 1] == solved.blocks[0][k - 1]
    p = 1 / (1 + np.exp(-refit.logits(design)))
    effect = refit.blocks[0].astype(float) - solved.blocks[0]
    gradient = np.bincount(ad, labels - p, minlength=k) - effect / 0.5
    np.testing.assert_allclose(gradient[: k - 1], 0.0, atol=1e-3)
    seen = np.arange(k - 1)
    fitted_corr = np.corrcoef(refit.blocks[0][seen], true_effect[seen])[0, 1]
    solved_spread = np.std(solved.blocks[0][seen])
    assert fitted_corr > 0.8 and np.std(refit.blocks[0][seen]) > 3 * solved_spread


def test_fit_wide_refits_the_named_feature_and_keeps_every_other_table(
    folder: FeatureFolder,
) -> None:
    """``refit_variance={"ad_id": v}`` through the model: the user and feature tables hold the
    plain fit's weights, the ad ids' move, and the refit's held-out log loss is reported."""
    rows = folder.table("training/ranking")
    fit, held = rows.iloc[: len(rows) * 3 // 4], rows.iloc[len(rows) * 3 // 4 :]
    labels = fit["label"].to_numpy()

    def fitted(refit: dict[str, float]):
        model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
        tensors = _tensors(model, frame_to_inputs(folder.spec, fit))
        held_tensors = _tensors(model, frame_to_inputs(folder.spec, held))
        metrics = fit_wide(model, tensors, labels, c=0.1, seed=7, refit_variance=refit,
                           held=(held_tensors, held["label"].to_numpy(), 0.0))  # fmt: skip
        return model, metrics

    plain, plain_metrics = fitted({})
    refit, metrics = fitted({"ad_id": 0.5})
    assert "wide_refit_holdout_logloss" in metrics
    assert "wide_refit_holdout_logloss" not in plain_metrics
    for table in wide_layers(plain)[0]:
        before = table.get_weights()[0]
        after = refit.get_layer(table.name).get_weights()[0]
        if table.name == "wide__ad_id":
            assert np.abs(after - before).max() > 0.05
        else:
            np.testing.assert_array_equal(after, before)


def test_random_slopes_with_a_column_of_ones_are_the_random_effects() -> None:
    """The vector form reduces to the scalar one: one column of ones, one variance."""
    rng = np.random.default_rng(3)
    n, k = 3000, 40
    value = rng.integers(0, k - 1, n)
    offset = rng.normal(-2, 0.5, n)
    planted = rng.normal(0, 1, k)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(offset + planted[value])))).astype(float)
    scalar = random_effects(offset, value, labels, k, 0.4)
    vector = random_slopes(offset, value, np.ones((n, 1)), labels, k, [0.4])
    np.testing.assert_allclose(vector[:, 0], scalar, atol=1e-9)
    assert vector[k - 1, 0] == 0.0  # no rows: stays at the prior's mode


def test_random_slopes_land_at_each_values_posterior_mode_and_recover_planted_tastes() -> None:
    """Each value's effect vector zeroes its log posterior's gradient (the priors' variances
    per column), and with a few hundred rows per value it recovers the planted slopes."""
    rng = np.random.default_rng(4)
    n, k, dim = 40_000, 60, 3
    value = rng.integers(0, k, n)
    query = rng.normal(0, 1, (n, dim))
    features = np.column_stack([np.ones(n), query])
    planted = rng.normal(0, [0.5, 0.8, 0.8, 0.8], (k, dim + 1))
    offset = np.full(n, -2.0)
    logit = offset + np.einsum("rk,rk->r", planted[value], features)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    variances = [0.25, 0.64, 0.64, 0.64]
    effect = random_slopes(offset, value, features, labels, k, variances)
    p = 1 / (1 + np.exp(-(offset + np.einsum("rk,rk->r", effect[value], features))))
    gradient = np.stack(
        [np.bincount(value, (labels - p) * features[:, i], minlength=k) for i in range(dim + 1)],
        1,
    ) - effect / np.asarray(variances)
    np.testing.assert_allclose(gradient, 0.0, atol=1e-6)
    for column in range(1, dim + 1):
        assert np.corrcoef(effect[:, column], planted[:, column])[0, 1] > 0.8
    with pytest.raises(ValueError, match="4 feature columns need 4 variances"):
        random_slopes(offset, value, features, labels, k, [0.25])


def test_the_log_evidence_prefers_the_prior_the_values_were_drawn_from() -> None:
    """Type-II maximum likelihood: effects drawn with variance 0.5 (600 values, 80 rows each)
    are explained best by a prior of 0.5, and clearly better than by one ten times narrower or
    wider."""
    rng = np.random.default_rng(5)
    k, n = 600, 48_000
    value = rng.integers(0, k, n)
    offset = np.full(n, -1.5)
    planted = rng.normal(0, np.sqrt(0.5), k)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(offset + planted[value])))).astype(float)
    ones = np.ones((n, 1))
    evidence = {}
    for variance in (0.05, 0.15, 0.5, 1.5, 5.0):
        effect = random_slopes(offset, value, ones, labels, k, [variance])
        evidence[variance] = slopes_log_evidence(offset, value, ones, labels, effect, [variance])
    assert max(evidence, key=evidence.get) == 0.5, evidence
    assert evidence[0.5] > evidence[0.05] + 10 and evidence[0.5] > evidence[5.0] + 10
