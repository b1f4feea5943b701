"""The replay against the truth (issue 10, item 1): hand-checkable numbers, then the real path.

The pure report is checked on tiny slates whose expected CTRs are computed by hand. The driver is
checked on the serving tests' real release (features, embeddings, ANNOY, exported ranker) with a
planted world over the same ids in which an ad's true click probability is ``sigmoid(quality)``
whatever the user: the oracle slate is the 10 best-quality ads, the popularity slate's value is
the mean of its ads' probabilities, and a "ranker" that scores the truth itself, swapped into the
release, must give exactly the oracle when it ranks every live ad.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest

from models.evaluation.replay import replay_report, slate_ctr

# --------------------------------------------------------------------------- pure numbers


def test_slate_ctr_averages_the_first_k_slots_and_counts_empty_slots_as_zero() -> None:
    slates = np.array([[0.4, 0.2, np.nan], [0.1, 0.1, 0.1]])
    np.testing.assert_allclose(slate_ctr(slates, 1), [0.4, 0.1])
    np.testing.assert_allclose(slate_ctr(slates, 3), [0.2, 0.1])
    # K beyond the slate: the missing slots earn nothing.
    np.testing.assert_allclose(slate_ctr(slates, 4), [0.15, 0.075])


def test_replay_report_gives_share_of_oracle_and_multiple_of_popularity() -> None:
    slates = {
        "oracle": np.array([[0.5, 0.3], [0.3, 0.1]]),  # top-2 means 0.4, 0.2 → 0.3
        "popularity": np.array([[0.1, 0.1], [0.1, 0.1]]),  # 0.1
        "deepclick": np.array([[0.3, 0.3], [0.15, 0.15]]),  # 0.3, 0.15 → 0.225
    }
    report = replay_report(slates, ks=(1, 2), bootstrap=50)
    top2 = report["systems"]["deepclick"]["top_2"]
    assert top2["expected_ctr"] == pytest.approx(0.225)
    assert top2["share_of_oracle"] == pytest.approx(0.225 / 0.3)
    assert top2["x_popularity"] == pytest.approx(2.25)
    top1 = report["systems"]["deepclick"]["top_1"]
    assert top1["share_of_oracle"] == pytest.approx(0.225 / 0.4)
    assert report["systems"]["oracle"]["top_2"]["share_of_oracle"] == pytest.approx(1.0)
    low, high = top2["share_of_oracle_ci95"]
    assert low <= top2["share_of_oracle"] <= high
    # popularity is constant: its multiple of itself has no spread
    assert report["systems"]["popularity"]["top_2"]["x_popularity_ci95"] == [1.0, 1.0]


def test_replay_report_refuses_comparators_answering_different_requests() -> None:
    with pytest.raises(ValueError, match="same requests"):
        replay_report({"oracle": np.zeros((2, 1)), "x": np.zeros((3, 1))})


# --------------------------------------------------------------------------- the real path


def planted_world(users: list[str], placements: list[str], ads: list[str], quality: np.ndarray):
    """A world over the release's ids where p(click) = sigmoid(quality[ad]) for everyone."""
    from pipelines.simulate import World
    from pipelines.simulate.world import NEVER

    def ids(values: list[str]) -> np.ndarray:
        return np.asarray(values)

    nu, npl, na = len(users), len(placements), len(ads)
    zeros = np.zeros
    return World(
        seed=0, start_date="2024-01-01", days=3, latent_dim=1, intercept=0.0, scale=0.0,
        price_affinity=0.0, hour_traffic=np.ones(24), hour_effect=zeros(24),
        user_ids=ids(users), user_segid=zeros(nu, int), user_group=zeros(nu, int),
        user_gender=zeros(nu, int), user_age=zeros(nu, int), user_pvalue=np.full(nu, 2),
        user_shopping=zeros(nu, int), user_occupation=zeros(nu, int),
        user_new_class=zeros(nu, int), user_factor=zeros((nu, 1)), user_bias=zeros(nu),
        user_activity=np.ones(nu),
        placement_ids=ids(placements), placement_page=zeros(npl, int),
        placement_slot=zeros(npl, int), placement_position=zeros(npl, int),
        placement_factor=zeros((npl, 1)), placement_bias=zeros(npl),
        placement_traffic=np.ones(npl), placement_birth=zeros(npl, int),
        ad_ids=ids(ads), ad_cate=zeros(na, int), ad_campaign=zeros(na, int),
        ad_customer=zeros(na, int), ad_brand=zeros(na, int), ad_price=np.ones(na),
        ad_bid=np.ones(na), ad_factor=zeros((na, 1)), ad_quality=quality,
        ad_log_price_z=zeros(na), ad_popularity=np.ones(na), ad_birth=zeros(na, int),
        ad_end=np.full(na, NEVER),
    )  # fmt: skip


class TruthPeer:
    """A "ranker" that knows the world: it scores each candidate by its true probability."""

    name = "truth"

    def __init__(self, p_by_ad: dict[str, float]) -> None:
        self.p_by_ad = p_by_ad

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return frame["ad_id"].map(self.p_by_ad).to_numpy(dtype=np.float64)


def test_replay_through_the_serving_path_against_a_planted_world(world, tmp_path_factory) -> None:
    from lifecycle.replay import (
        DEEPCLICK,
        POPULARITY,
        RANDOM,
        RANKER_ALL,
        RANKER_POPULAR,
        PeerBackend,
        replay,
        sample_requests,
        write_replay,
    )
    from pipelines.retrieval_eval import training_counts
    from serving.release import load_release

    world_dir = world
    folder = world_dir.features
    release = load_release(world_dir.release, world_dir.settings())
    ad_table = folder.table("entities/ads")["ad_id"].astype(str).tolist()
    ads = [f"a{i:05d}" for i in range(len(ad_table))]
    assert sorted(ad_table) == ads
    users = [f"u{i:05d}" for i in range(len(folder.table("entities/users")))]
    placements = [f"p{i:03d}" for i in range(len(folder.table("entities/placements")))]
    # Ten "star" ads with high quality; every other ad low and slightly falling with its index.
    quality = -3.0 - 0.001 * np.arange(len(ads))
    stars = np.arange(5, len(ads), len(ads) // 10)[:10]
    quality[stars] = -1.0 - 0.01 * np.arange(10)
    world = planted_world(users, placements, ads, quality)
    p = 1.0 / (1.0 + np.exp(-quality))
    day = dt.date(2024, 1, 3)
    eval_rows = folder.table("eval")
    requests = sample_requests(eval_rows, 40, seed=1)
    counts = training_counts(folder.path)

    truth_ranked = dataclasses.replace(
        release, backend=PeerBackend(TruthPeer(dict(zip(ads, p, strict=True))))
    )
    report = replay(truth_ranked, world, requests, day, counts=counts, num_candidates=50)
    systems = report["systems"]
    oracle_ctr = float(p[stars].mean())
    assert systems["oracle"]["top_10"]["expected_ctr"] == pytest.approx(oracle_ctr)
    # the truth ranking every live ad IS the oracle
    assert systems[RANKER_ALL]["top_10"]["expected_ctr"] == pytest.approx(oracle_ctr)
    assert systems[RANKER_ALL]["top_10"]["share_of_oracle"] == pytest.approx(1.0)
    # popularity: the 10 ads with the most training clicks (ties: impressions, then id)
    by_ad = counts.groupby("ad_id")[["clicks", "impressions"]].sum().reset_index()
    top = by_ad.sort_values(["clicks", "impressions", "ad_id"], ascending=[False, False, True])
    popular_idx = [ads.index(a) for a in top["ad_id"].astype(str).head(10)]
    assert systems[POPULARITY]["top_10"]["expected_ctr"] == pytest.approx(p[popular_idx].mean())
    # random live ads average the catalogue's probability (within sampling noise)
    random_ctr = systems[RANDOM]["top_10"]["expected_ctr"]
    assert abs(random_ctr - p.mean()) < 4 * p.std() / math.sqrt(400)
    # nobody beats the oracle; the truth over fewer candidates is at most the oracle
    for name in (DEEPCLICK, RANKER_POPULAR, POPULARITY, RANDOM):
        assert systems[name]["top_10"]["share_of_oracle"] <= 1.0 + 1e-9, name
    files = write_replay(report, tmp_path_factory.mktemp("replay"))
    assert files["plot"].stat().st_size > 0
    assert "| oracle |" in files["markdown"].read_text()

    # The release's own ranker through the same path: served ads are real ads of the catalogue.
    served = replay(release, world, requests.head(10), day, counts=counts, all_ads=0)
    assert served["systems"][DEEPCLICK]["top_10"]["expected_ctr"] > 0
    assert len(served["examples"][DEEPCLICK][0]) == 10
    assert set(served["examples"][DEEPCLICK][0]) <= set(ads)
    release.close()


def test_requests_carry_the_hour_of_the_impression() -> None:
    from lifecycle.replay import request_times, sample_requests

    rows = pd.DataFrame(
        {"user_id": ["u1", "u2"], "placement_id": ["p1", "p2"], "ctx__hour": [3, 23]}
    )
    requests = sample_requests(rows, 5, seed=0)
    assert sorted(requests["hour"]) == [3, 23]
    times = request_times(dt.date(2024, 1, 4), np.array([23]), "UTC")
    assert times[0].isoformat() == "2024-01-04T23:30:00+00:00"
    with pytest.raises(ValueError, match="no impressions"):
        sample_requests(rows.iloc[:0], 5)


def test_evaluate_command_prints_intervals_writes_beside_the_run_and_matches_it(
    world, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 11, item 13): ``deepclick evaluate`` printed no interval, wrote into the
    run's published ``evaluations/<v>/`` and drew another bootstrap than the daily run."""
    from typer.testing import CliRunner

    from candidates.store import read_embeddings
    from deepclick_cli.main import app
    from models.evaluation.report import evaluate_ranking
    from models.ranker.similarity import EmbeddingSimilarity

    world_dir = world
    monkeypatch.setenv("DEEPCLICK_ROOT", str(world_dir.root))
    monkeypatch.setenv("DEEPCLICK_PREDICTOR__MODEL_NAME", "ranker")
    monkeypatch.setenv("DEEPCLICK_LIFECYCLE__EVAL_BOOTSTRAP", "30")
    monkeypatch.setenv("COLUMNS", "80")  # a plain terminal: no interval elided
    result = CliRunner().invoke(app, ["evaluate", "--date", "2024-01-03", "--no-peers"])
    assert result.exit_code == 0, result.output
    out = world_dir.root / "reports" / "20240103" / "ranker-20240103"
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (world_dir.root / "evaluations").exists()
    low, high = metrics["models"]["ranker"]["auc_ci95"]
    assert f"{low:.3f}–{high:.3f}" in result.output
    assert "calib. CI" in result.output
    # the daily run's evaluation: the same rows, resamples (lifecycle.eval_bootstrap) and seed
    daily = evaluate_ranking(
        world_dir.ranker,
        world_dir.features.path,
        tmp_path_factory.mktemp("daily"),
        similarity=EmbeddingSimilarity(read_embeddings(world_dir.embeddings)),
        bootstrap=30,
    )
    assert daily.metrics["models"]["ranker"]["auc_ci95"] == [low, high]


def test_funnel_recall_at_each_k_asks_the_candidate_stage_for_k(world) -> None:
    """Regression: funnel recall@100 was read from the first 100 of the 500-candidate list, which
    the quotas and the popularity prior leave unordered (demo: 0.089, against 0.224 for a K = 100
    query). At each K the list must be what serving scores when it asks for K candidates."""
    from lifecycle.replay import funnel_recall
    from serving.release import load_release

    release = load_release(world.release, world.settings())
    try:
        rows = world.features.table("eval")
        report = funnel_recall(release, rows, [5, 40], queries=60, seed=3)
        clicks = rows[rows["label"] == 1]
        clicks = clicks.sample(n=min(60, len(clicks)), random_state=3)
        assert report["clicks"] == len(clicks)
        for k in (5, 40):
            found = [
                ad in release.candidates.candidates(user, placement, k).ad_ids
                for user, placement, ad in zip(
                    clicks["user_id"].astype(str),
                    clicks["placement_id"].astype(str),
                    clicks["ad_id"].astype(str),
                    strict=True,
                )
            ]
            assert report["recall_at_k"][str(k)] == pytest.approx(np.mean(found))
    finally:
        release.close()
