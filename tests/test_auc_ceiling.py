"""bench/auc_ceiling.py: the world's equation re-assembled from parts, and the per-entity parts
learned back from clicks drawn from that very world."""

from __future__ import annotations

import numpy as np
import pytest

from deepclick.settings import SimulateSettings


@pytest.fixture(scope="module")
def world():
    from pipelines.simulate import build_world

    return build_world(
        SimulateSettings(num_users=40, num_placements=6, num_ads=80, num_advertisers=5, days=2)
    )


def _rows(world, n: int, seed: int, users: np.ndarray | None = None):
    from bench.auc_ceiling import Rows, logit, true_parts

    rng = np.random.default_rng(seed)
    user = rng.choice(users if users is not None else world.num_users, n)
    placement = rng.integers(0, world.num_placements, n)
    ad = rng.integers(0, world.num_ads, n)
    hour = rng.integers(0, 24, n)
    rows = Rows(user, placement, ad, hour, np.zeros(n))
    p = 1.0 / (1.0 + np.exp(-logit(world, true_parts(world), rows)))
    return Rows(user, placement, ad, hour, (rng.random(n) < p).astype(float))


def test_the_true_parts_give_the_worlds_true_logit(world):
    from bench.auc_ceiling import logit, true_parts
    from pipelines.simulate.world import true_logit

    rows = _rows(world, 500, seed=1)
    expected = true_logit(world, rows.user, rows.placement, rows.ad, rows.hour)
    np.testing.assert_allclose(logit(world, true_parts(world), rows), expected, rtol=1e-6)


def test_users_own_parts_are_learned_back_from_their_clicks_and_the_unseen_keep_the_fields(world):
    from bench.auc_ceiling import field_parts, learned_parts, logit, true_parts
    from models.evaluation.ranking import auc

    truth, fields = true_parts(world), field_parts(world)
    seen = np.arange(world.num_users // 2)  # the other half never shows up in the window
    window = _rows(world, 200_000, seed=2, users=seen)
    learned = learned_parts(world, truth, fields, window, ("user",), rounds=1)

    own_true = truth.user_bias[seen] - fields.user_bias[seen]
    own_learned = learned.user_bias[seen] - fields.user_bias[seen]
    assert np.corrcoef(own_true, own_learned)[0, 1] > 0.8
    unseen = np.arange(world.num_users // 2, world.num_users)
    np.testing.assert_allclose(learned.user_bias[unseen], fields.user_bias[unseen])
    np.testing.assert_allclose(learned.user_factor[unseen], fields.user_factor[unseen])
    # On fresh rows of the seen users, the learned parts rank better than the fields alone.
    fresh = _rows(world, 100_000, seed=3, users=seen)
    without = truth.with_side("user", fields.user_bias, fields.user_factor)
    assert auc(fresh.label, logit(world, learned, fresh)) > auc(
        fresh.label, logit(world, without, fresh)
    )


def test_slates_of_the_true_parts_are_the_oracles_and_the_fields_alone_serve_less(world):
    """``slate_shares``: the world believed as it is picks the oracle's very slates (share 1);
    the fields' projection alone picks worse ones, valued by the same truth."""
    import datetime as dt

    import pandas as pd

    from bench.auc_ceiling import field_parts, slate_shares, true_parts

    rng = np.random.default_rng(4)
    requests = pd.DataFrame(
        {
            "user_id": world.user_ids[rng.integers(0, world.num_users, 200)],
            "placement_id": world.placement_ids[rng.integers(0, world.num_placements, 200)],
            "hour": rng.integers(0, 24, 200),
        }
    )
    day = dt.date.fromisoformat(SimulateSettings().start_date)
    believed = {"truth": true_parts(world), "fields": field_parts(world)}
    rows = {r["slates of"]: r for r in slate_shares(world, believed, requests, day, bootstrap=50)}
    assert rows["truth"]["share_of_oracle"] == pytest.approx(1.0)
    assert rows["truth"]["top10_ctr"] == pytest.approx(rows["oracle"]["top10_ctr"])
    assert rows["fields"]["ci_high"] < 1.0
