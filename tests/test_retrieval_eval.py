"""The retrieval evaluation: the pure report functions on tiny hand-computed cases, the popularity
baseline against the features stage's own table, ground-truth best ads against brute force, and
the whole runner on a planted folder with planted two-tower vectors (users of group g click ads of
category g, so vectors that say so must beat popularity, and ALS must miss every new ad)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feature_folder import FeatureFolder, write_feature_folder

from candidates.index import build_index
from candidates.store import EmbeddingTable, encode_ids, publish_embeddings
from deepclick.settings import IndexSettings, Settings, SimulateSettings
from models.evaluation.retrieval import recall_at_k
from models.evaluation.retrieval_report import (
    ALS,
    METHODS,
    POPULARITY_OVERALL,
    POPULARITY_PLACEMENT,
    TWO_TOWER_EXACT,
    RetrievalEvalConfig,
    additive_queries,
    method_recall,
    most_clicked,
    popularity_lists,
    popularity_rankings,
    rank_by_dot,
    retrieval_report,
    sample_clicks,
    target_check,
    top_ads_coverage,
)
from pipelines.als import AlsParams
from pipelines.build_index import popularity_rows
from pipelines.retrieval_eval import (
    PLOT_FILE,
    REPORT_FILE,
    evaluate_retrieval,
    training_counts,
    truth_best_ads,
)


def approx(value: float) -> object:
    """Report values are rounded to 6 decimals."""
    return pytest.approx(value, abs=1e-6)


# --- pure functions on tiny inputs --------------------------------------------------------------


def test_report_recall_cold_start_coverage_truth_and_target_by_hand():
    # Three queries clicked a1, a2, a3; the second click is on an ad new that day.
    retrieved = {
        "model": {1: [["a1"], ["a9"], ["a8"]], 2: [["a1", "a9"], ["a9", "a2"], ["a8", "a7"]]},
        POPULARITY_OVERALL: {1: [["a9"]] * 3, 2: [["a9", "a1"]] * 3},
    }
    config = RetrievalEvalConfig(ks=(1, 2), target_k=2, target_method="model")
    report = retrieval_report(
        retrieved,
        ["a1", "a2", "a3"],
        new_ad=np.array([False, True, False]),
        config=config,
        top_ads=["a9", "a5"],
        best_ads=[["a1", "a9"], ["a2", "a3"], ["a7", "a6"]],
    )
    assert report["recall_at_k"]["model"] == {"1": approx(1 / 3), "2": approx(2 / 3)}
    assert report["recall_at_k"][POPULARITY_OVERALL] == {"1": 0.0, "2": approx(1 / 3)}
    cold = report["cold_start"]
    assert cold["clicks_on_new_ads"] == 1 and cold["share_of_clicks"] == approx(1 / 3)
    assert cold["recall_at_k"]["model"] == {"1": 0.0, "2": 1.0}
    assert cold["warm_recall_at_k"]["model"] == {"1": 0.5, "2": 0.5}
    # a9 is in q1's top-1 only, in q0's and q1's top-2; a5 never: 1 of 6 and 2 of 6 (query, ad).
    coverage = report["popular_ads"]["coverage"]["model"]
    assert coverage["1"] == {"ever_retrieved": 1, "mean_query_share": approx(1 / 6)}
    assert coverage["2"] == {"ever_retrieved": 1, "mean_query_share": approx(2 / 6)}
    assert report["popular_ads"]["coverage"][POPULARITY_OVERALL]["1"]["mean_query_share"] == 0.5
    # Best ads: top-1 finds 1/2, 0, 0; top-2 finds 2/2, 1/2, 1/2.
    truth = report["ground_truth"]["recall_at_k"]["model"]
    assert truth == {"1": approx(1 / 6), "2": approx(2 / 3)}
    assert report["target"]["baseline"] == POPULARITY_OVERALL
    assert report["target"]["ratio"]["model"] == approx(2.0)
    assert report["target"]["met"] is True
    assert json.loads(json.dumps(report)) == report  # the returned dict is the JSON


def test_target_is_judged_against_the_stronger_popularity_baseline():
    curves = {
        "two_tower_ann": {500: 0.6},
        POPULARITY_PLACEMENT: {500: 0.4},
        POPULARITY_OVERALL: {500: 0.2},
    }
    check = target_check(curves, RetrievalEvalConfig())
    assert check["baseline"] == POPULARITY_PLACEMENT
    assert check["ratio"]["two_tower_ann"] == pytest.approx(1.5)
    assert check["met"] is False


def test_set_recall_of_fixed_size_truth_equals_recall_at_k_of_lists():
    rng = np.random.default_rng(1)
    ranked = rng.integers(0, 30, (50, 20))
    truth = np.stack([rng.choice(30, 4, replace=False) for _ in range(50)])
    fast = method_recall({5: ranked[:, :5], 20: ranked}, truth)
    slow = {k: recall_at_k(ranked[:, :k], [list(t) for t in truth], [k])[k] for k in (5, 20)}
    assert fast == pytest.approx(slow)
    assert method_recall({5: ranked}, truth, rows=np.array([], dtype=int)) == {5: None}


def test_sample_clicks_is_seeded_and_ignores_file_order():
    rows = pd.DataFrame(
        {"event_id": [f"e{i}" for i in range(10)], "label": [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]}
    )
    first = sample_clicks(rows, 4, seed=3)
    shuffled = sample_clicks(rows.sample(frac=1.0, random_state=9), 4, seed=3)
    assert len(first) == 4 and (first["label"] == 1).all()
    assert first["event_id"].tolist() == shuffled["event_id"].tolist()
    assert len(sample_clicks(rows, 100, seed=3)) == 7


def test_popularity_lists_order_and_per_placement_fallback():
    counts = pd.DataFrame(
        {
            "placement_id": ["p1", "p1", "p1", "p2", "p2"],
            "ad_id": ["a", "b", "c", "b", "d"],
            "clicks": [2, 2, 0, 3, 1],
            "impressions": [10, 20, 5, 9, 9],
        }
    )
    lists = popularity_lists(counts)
    # overall clicks: b 5, a 2, d 1, c 0 — ties broken by impressions, then id.
    assert lists.overall == ("b", "a", "d", "c")
    assert lists.by_placement["p1"] == ("b", "a", "c")  # b ties a on clicks, more impressions
    assert lists.by_placement["p2"] == ("b", "d")
    per = popularity_rankings(lists, ["p2", "p9", "p1"], 3, per_placement=True)
    assert per == [["b", "d", "a"], ["b", "a", "d"], ["b", "a", "c"]]
    overall = popularity_rankings(lists, ["p2", "p9"], 2, per_placement=False)
    assert overall == [["b", "a"], ["b", "a"]]


def test_queries_add_user_and_placement_with_fallbacks_and_rank_by_dot():
    users = _table("users", ["u1", "u2"], [[1.0, 0.0], [0.0, 1.0]])
    placements = _table("placements", ["p1"], [[0.5, 0.5]])
    queries, user_known, placement_known = additive_queries(
        users, placements, np.array([9.0, 9.0]), np.array([-1.0, 0.0]), ["u2", "ux"], ["p1", "py"]
    )
    np.testing.assert_allclose(queries, [[0.5, 1.5], [8.0, 9.0]])
    assert user_known.tolist() == [True, False] and placement_known.tolist() == [True, False]
    ads = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    ranked = rank_by_dot(np.array([[2.0, 1.0]], dtype=np.float32), ads, encode_ids("abc"), 2)
    assert ranked.tolist() == [["c", "a"]]  # scores 2, 1, 3


def test_most_clicked_and_coverage_on_id_lists():
    assert most_clicked(["b", "a", "b", "c", "a", "d"], 2) == ["a", "b"]  # ties by id
    coverage = top_ads_coverage({2: [["a", "x"], ["y", "z"]]}, ["a", "b"])
    assert coverage == {2: {"ever_retrieved": 1, "mean_query_share": 0.25}}
    assert top_ads_coverage({2: [["a"]]}, []) == {2: {"ever_retrieved": 0, "mean_query_share": 0.0}}


def _table(name: str, ids: list[str], vectors: list[list[float]]) -> EmbeddingTable:
    encoded = encode_ids(ids)
    order = np.argsort(encoded)
    return EmbeddingTable(name, encoded[order], np.asarray(vectors, dtype=np.float32)[order])


# --- baselines and ground truth against independent answers ------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("retrieval") / "20240104",
        users=300,
        placements=6,
        ads=400,
        new_ads=40,
        groups=8,
        impressions_per_day=8000,
        seed=21,
    )


def test_popularity_baseline_continues_the_features_stage_table(folder):
    lists = popularity_lists(training_counts(folder.path))
    table = folder.table("popularity")
    for placement, group in table.groupby("placement_id"):
        stage = group.sort_values("rank")["ad_id"].tolist()
        ours = lists.overall if placement == "__all__" else lists.by_placement[placement]
        assert list(ours[: len(stage)]) == stage
    # Not cut at top_n: every ad shown in training is ranked.
    assert len(lists.overall) == folder.table("training/ranking")["ad_id"].nunique()


def test_truth_best_ads_are_the_highest_true_p_live_ads():
    from pipelines.simulate import build_world, live_ads, true_click_probability

    world = build_world(
        SimulateSettings(num_users=30, num_placements=4, num_ads=60, num_advertisers=4, days=2)
    )
    users, placements, hours = [0, 5, 7], [1, 2, 1], [3, 12, 20]
    best = truth_best_ads(
        world, world.user_ids[users], world.placement_ids[placements], hours, world.dates[1], 10
    )
    live = live_ads(world, 1)
    for row, (user, placement, hour) in enumerate(zip(users, placements, hours, strict=True)):
        p_click = true_click_probability(world, user, placement, live, hour)
        chosen = np.isin(world.ad_ids[live], best[row])
        assert chosen.sum() == 10
        assert p_click[chosen].min() >= p_click[~chosen].max()
    with pytest.raises(ValueError, match=r"world\.npz"):
        truth_best_ads(world, ["u00007"], ["p1"], [0], world.dates[1], 10)


# --- the runner end to end ---------------------------------------------------------------------


def planted_release(folder: FeatureFolder, root: Path) -> tuple[Path, Path]:
    """Embeddings that know the planted answer (user of group g → e_g, ad of category c → e_c,
    placements ~0), without 5% of the users (they get the fallback), and their ANNOY index."""
    rng = np.random.default_rng(0)
    groups = folder.truth.groups
    dim = groups + 2

    def one_hot(codes: list[int]) -> np.ndarray:
        vectors = 0.05 * rng.standard_normal((len(codes), dim))
        vectors[np.arange(len(codes)), codes] += 1.0
        return vectors

    users = folder.table("entities/users")["user_id"].tolist()
    users = users[: int(len(users) * 0.95)]
    placements = folder.table("entities/placements")["placement_id"].tolist()
    ads = folder.table("entities/ads")["ad_id"].tolist()
    tables = {
        "users": (users, one_hot([folder.truth.user_group[u] for u in users])),
        "placements": (placements, 0.05 * rng.standard_normal((len(placements), dim))),
        "ads": (ads, one_hot([folder.truth.ad_category[a] for a in ads])),
    }
    fallbacks = {"user": np.zeros(dim), "placement": np.zeros(dim)}
    embeddings = publish_embeddings(
        root / "embeddings", "20240104", tables, fallbacks, inputs={"features": "20240104"}
    )
    index = build_index(
        embeddings,
        root / "index",
        popularity=popularity_rows(folder.path),
        metric="dot",  # one-hot planted vectors: many exact ties, which dot's trees split well
        n_trees=10,
        recall_floor=0.0,
        recall_queries=50,
    )
    return embeddings, index


@pytest.mark.spark
def test_evaluate_retrieval_end_to_end_on_planted_vectors(spark, folder, tmp_path):
    embeddings, index = planted_release(folder, tmp_path)
    settings = Settings(root=tmp_path / "var", index=IndexSettings(popular_quota=0.2))
    config = RetrievalEvalConfig(ks=(10, 20, 50, 100), max_queries=300, target_k=50)
    out = tmp_path / "report"
    report = evaluate_retrieval(
        settings,
        "2024-01-04",
        embeddings_folder=embeddings,
        index_folder=index,
        features_folder=folder.path,
        spark=spark,
        out_dir=out,
        config=config,
        als=AlsParams(rank=8, iterations=5, seed=1),
    )
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["recall_at_k"]) == set(METHODS) == set(report["methods"])
    for key in ("target", "cold_start", "popular_ads", "ann", "als", "popularity", "queries"):
        assert report[key] is not None, key
    assert report["ground_truth"] is None  # no world.npz for a planted folder
    assert report["queries"]["sampled"] == 300
    assert 0.0 < report["queries"]["unknown_users"] < 0.2

    recall = report["recall_at_k"]
    # Planted vectors know who clicks what; popularity does not.
    for k in ("10", "20", "50"):
        assert recall[TWO_TOWER_EXACT][k] > recall[POPULARITY_PLACEMENT][k]
        assert recall[TWO_TOWER_EXACT][k] > recall[POPULARITY_OVERALL][k]
    assert report["target"]["ratio"][TWO_TOWER_EXACT] > 1.0
    # Exact search over 440 ads with 10 trees: the ANN path finds nearly all of the exact top-K.
    assert min(report["ann"]["measured_vs_exact"].values()) >= 0.8
    assert report["ann"]["manifest"]["ann_recall_at_k"] is not None
    # Cold start: new ads have planted vectors from their category, but no ALS vector.
    cold = report["cold_start"]
    assert cold["clicks_on_new_ads"] > 0
    assert all(v == 0.0 for v in cold["recall_at_k"][ALS].values())
    assert cold["recall_at_k"][TWO_TOWER_EXACT]["50"] > 0.0
    assert report["als"]["ads_without_vector"] >= len(folder.truth.new_ads)
    assert report["als"]["clicks_on_ads_without_vector"] >= cold["share_of_clicks"]
    # The popular quota puts popular ads back into the candidates.
    coverage = report["popular_ads"]["coverage"]
    for k in ("10", "50"):
        assert (
            coverage["two_tower_popular"][k]["mean_query_share"]
            >= coverage["two_tower_ann"][k]["mean_query_share"]
        )
