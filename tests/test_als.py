"""The ALS baseline (pipelines/als.py) on a planted features folder: users of group g click ads of
category g, so ALS must put each user closest to its group's ads; users and placements must share
the ad space (a query is their sum); the same seed must give the same vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from feature_folder import FeatureFolder, write_feature_folder

from pipelines.als import AlsVectors, interaction_ratings, train_als

pytestmark = pytest.mark.spark

PARAMS = {"rank": 8, "reg": 0.05, "alpha": 10.0, "iterations": 6, "seed": 3, "blocks": 2}
GROUPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("als") / "20240104",
        users=240,
        placements=8,
        ads=160,
        new_ads=8,
        groups=GROUPS,
        impressions_per_day=8000,
        seed=5,
    )


@pytest.fixture(scope="module")
def vectors(spark, folder: FeatureFolder) -> AlsVectors:
    return train_als(spark, folder.path, **PARAMS)


def ids(table) -> list[str]:
    return [bytes(i).decode() for i in table.ids]


def category_share_of_top(
    queries: np.ndarray, groups: list[int], vectors: AlsVectors, folder: FeatureFolder, k: int
) -> float:
    """Mean share of each query's top-k ALS ads whose category is the query's group."""
    category = np.array([folder.truth.ad_category[a] for a in ids(vectors.ads)])
    top = np.argsort(-(queries @ np.asarray(vectors.ads.vectors).T), axis=1)[:, :k]
    return float((category[top] == np.asarray(groups)[:, None]).mean())


def test_users_are_closest_to_the_ads_of_their_groups_category(vectors, folder):
    users = ids(vectors.users)
    groups = [folder.truth.user_group[u] for u in users]
    share = category_share_of_top(np.asarray(vectors.users.vectors), groups, vectors, folder, 10)
    assert share >= 0.8, f"only {share:.2f} of each user's top-10 ads match (random: 0.25)"


def test_a_query_is_user_plus_placement_and_keeps_the_users_taste(vectors, folder):
    users = ids(vectors.users)[:60]
    placements = ids(vectors.placements)
    rng = np.random.default_rng(0)
    chosen = [placements[i] for i in rng.integers(0, len(placements), len(users))]
    queries = np.stack([vectors.query(u, p) for u, p in zip(users, chosen, strict=True)])
    expected = np.stack(
        [
            vectors.users.vector(u) + vectors.placements.vector(p)
            for u, p in zip(users, chosen, strict=True)
        ]
    )
    np.testing.assert_allclose(queries, expected, rtol=1e-6)
    # Placements were factorised against the same ads: adding one must not scramble the user's
    # taste, as a vector from another space would.
    groups = [folder.truth.user_group[u] for u in users]
    assert category_share_of_top(queries, groups, vectors, folder, 10) >= 0.7


def test_placement_vectors_rank_the_ads_clicked_on_that_placement(vectors, folder):
    clicks = folder.table("training/retrieval")
    ad_ids = ids(vectors.ads)
    correlations = []
    for placement in ids(vectors.placements):
        counts = clicks.loc[clicks["placement_id"] == placement, "ad_id"].value_counts()
        scores = np.asarray(vectors.ads.vectors) @ vectors.placements.vector(placement)
        clicked = counts.reindex(ad_ids, fill_value=0).to_numpy()
        correlations.append(pd.Series(scores).corr(pd.Series(clicked), method="spearman"))
    # Placements see every group's users, so their vectors carry the ads' popularity there
    # (unrelated vectors would correlate ~0).
    assert np.mean(correlations) >= 0.4 and min(correlations) >= 0.25, correlations


def test_unknown_user_and_placement_get_the_mean_vectors(vectors):
    np.testing.assert_allclose(
        vectors.fallback_user, np.asarray(vectors.users.vectors).mean(axis=0), rtol=1e-5
    )
    np.testing.assert_allclose(
        vectors.query("stranger", "nowhere"),
        vectors.fallback_user + vectors.fallback_placement,
        rtol=1e-6,
    )


def test_ads_without_training_clicks_get_no_vector(vectors, folder):
    clicked = set(folder.table("training/retrieval")["ad_id"])
    assert set(ids(vectors.ads)) == clicked
    assert all(vectors.ads.row(ad) is None for ad in folder.truth.new_ads)
    assert vectors.counts["ads"] == len(clicked)
    assert vectors.counts["users"] + vectors.counts["placements"] == len(
        set(folder.table("training/retrieval")["user_id"])
    ) + len(set(folder.table("training/retrieval")["placement_id"]))


def test_same_seed_gives_the_same_vectors(spark, folder, vectors):
    again = train_als(spark, folder.path, **PARAMS)
    for name in ("users", "placements", "ads"):
        first, second = getattr(vectors, name), getattr(again, name)
        assert np.array_equal(first.ids, second.ids)
        np.testing.assert_allclose(first.vectors, second.vectors, rtol=0, atol=1e-6)


def test_ranking_source_rates_unclicked_impressions_negatively(spark, folder):
    weighted = train_als(spark, folder.path, **PARAMS, source="ranking", negative_weight=0.2)
    # Every ad shown in training now has a vector (shown-but-unclicked pairs are entries).
    shown = set(folder.table("training/ranking")["ad_id"])
    assert set(ids(weighted.ads)) == shown
    users = ids(weighted.users)
    groups = [folder.truth.user_group[u] for u in users]
    share = category_share_of_top(np.asarray(weighted.users.vectors), groups, weighted, folder, 10)
    assert share >= 0.7


def test_interaction_ratings_put_users_and_placements_in_one_row_space(spark):
    rows = spark.createDataFrame(
        pd.DataFrame(
            {
                "user_id": ["u1", "u1", "u1", "u2"],
                "placement_id": ["p1", "p1", "p2", "p1"],
                "ad_id": ["a1", "a1", "a2", "a2"],
                "label": [1, 1, 0, 0],
            }
        )
    )
    clicks = interaction_ratings(rows.filter("label = 1"))
    got = {(r.row, r.ad_id): r.rating for r in clicks.collect()}
    assert got == {("user:u1", "a1"): 2.0, ("placement:p1", "a1"): 2.0}

    weighted = interaction_ratings(rows, source="ranking", negative_weight=0.5)
    got = {(r.row, r.ad_id): r.rating for r in weighted.collect()}
    assert got == {
        ("user:u1", "a1"): 2.0,
        ("placement:p1", "a1"): 2.0,
        ("user:u1", "a2"): -0.5,  # shown once, never clicked
        ("user:u2", "a2"): -0.5,
        ("placement:p2", "a2"): -0.5,
        ("placement:p1", "a2"): -0.5,
    }
