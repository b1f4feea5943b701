"""bench/slate_gap.py: the truth terms, the scorers over them and the paired slate gap."""

from __future__ import annotations

import numpy as np
import pandas as pd

from deepclick.settings import SimulateSettings


def _world_rows():
    from pipelines.simulate import build_world

    world = build_world(
        SimulateSettings(num_users=30, num_placements=4, num_ads=60, num_advertisers=4, days=2)
    )
    users, places, ads, hours = [0, 5, 7, 29], [1, 2, 1, 3], [3, 40, 59, 0], [3, 12, 20, 23]
    frame = pd.DataFrame(
        {
            "user_id": world.user_ids[users],
            "placement_id": world.placement_ids[places],
            "ad_id": world.ad_ids[ads],
            "ctx__hour": [str(h) for h in hours],
        }
    )
    return world, frame, (users, places, ads, hours)


def test_truth_terms_add_up_to_the_worlds_true_logit():
    from bench.slate_gap import truth_terms
    from pipelines.simulate.world import true_logit

    world, frame, (users, places, ads, hours) = _world_rows()
    terms = truth_terms(world, frame)
    assert terms.shape == (4, 5 + world.latent_dim)
    expected = true_logit(world, np.array(users), np.array(places), np.array(ads), np.array(hours))
    np.testing.assert_allclose(world.intercept + terms.sum(axis=1), expected, rtol=1e-5)


def test_truth_term_scorer_orders_ads_by_the_chosen_terms_only():
    from bench.slate_gap import truth_term_scorer, truth_terms
    from pipelines.simulate.world import ad_score

    world, frame, (users, places, ads, _) = _world_rows()
    terms = truth_terms(world, frame)
    np.testing.assert_allclose(truth_term_scorer(world, [3])(frame), world.ad_quality[ads])
    np.testing.assert_allclose(truth_term_scorer(world, [5])(frame), terms[:, 5:].sum(axis=1))
    full = truth_term_scorer(world, [3, 4, 5])(frame)
    u, p, a = np.array(users), np.array(places), np.array(ads)
    np.testing.assert_allclose(full, ad_score(world, u, p, a, all_pairs=False), rtol=1e-5)


def test_slate_difference_is_the_paired_gap_in_share_of_oracle():
    from bench.slate_gap import slate_difference

    oracle = np.full((4, 10), 0.4)
    better = np.full((4, 10), 0.2)
    worse = np.full((4, 10), 0.1)
    worse[:, 5:] = np.nan  # an empty slot earns nothing: 0.05 a slot on average
    diff, low, high = slate_difference(better, worse, oracle)
    assert diff == low == high == (0.2 - 0.05) / 0.4


def test_top_slots_breaks_ties_by_candidate_order_like_rank():
    from bench.slate_gap import SLOTS, top_slots

    ids = np.asarray([f"a{i}" for i in range(12)], dtype=object)
    keys = np.zeros(12)
    keys[[3, 11]] = 1.0
    assert top_slots(keys, ids)[:3] == ["a3", "a11", "a0"]
    assert len(top_slots(keys, ids)) == SLOTS


def test_each_variant_is_paired_with_its_seeds_first_and_a_seeds_first_with_the_served_ranker():
    """Regression (session 16): the first variant of a seed had no slate difference at all, so
    a lone variant could be judged against the served ranker on AUC only."""
    from bench.slate_gap import paired_bases

    bases = paired_bases([("base", "7"), ("rf", "7"), ("base8", "8"), ("rf8", "8"), ("x", "9")])
    assert bases == {
        "ranker_base": "ranker",
        "ranker_rf": "ranker_base",
        "ranker_base8": "ranker",
        "ranker_rf8": "ranker_base8",
        "ranker_x": "ranker",
    }
