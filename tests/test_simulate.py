"""The generated marketplace: contract layout, determinism, and the planted ground truth.

Every test checks a planted, known answer (the target CTR, the position effect, the heavy-tailed
quality, the day new ads are born, the exact truth the world file reproduces), not only that the
code runs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from deepclick.settings import SimulateSettings
from pipelines.simulate import (
    SimulationSummary,
    World,
    best_ads,
    index_of,
    live_ads,
    load_world,
    roc_auc,
    run_simulate,
    true_click_probability,
)
from pipelines.simulate.world import POSITION_EFFECT

CONTRACT = {
    "raw_sample.csv": ["impression_id", "user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"],
    "ad_feature.csv": ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price", "bid"],
    "user_profile.csv": [
        "userid",
        "cms_segid",
        "cms_group_id",
        "final_gender_code",
        "age_level",
        "pvalue_level",
        "shopping_level",
        "occupation",
        "new_user_class_level",
    ],
    "placement_feature.csv": ["pid", "page_type", "slot_size", "position"],
}
DATES = ["2024-03-01", "2024-03-02", "2024-03-03"]


def small_settings(**overrides: object) -> SimulateSettings:
    values: dict[str, object] = {
        "seed": 11,
        "start_date": DATES[0],
        "days": len(DATES),
        "impressions_per_day": 20_000,
        "num_users": 3_000,
        "num_placements": 300,
        "num_advertisers": 50,
        "num_ads": 1_500,
        "new_ads_per_day": 0.05,
        "new_placements_per_day": 0.1,
        "ads_retired_per_day": 0.02,
    }
    values.update(overrides)
    return SimulateSettings(**values)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationSummary]:
    out = tmp_path_factory.mktemp("marketplace")
    return out, run_simulate(small_settings(), out, progress=False)


@pytest.fixture(scope="module")
def world(simulated: tuple[Path, SimulationSummary]) -> World:
    return load_world(simulated[0] / "_truth" / "world.npz")


def read_csv(path: Path) -> pa.Table:
    """Every column as a string, the way ingest sees a raw file before casting."""
    with path.open() as handle:
        header = handle.readline().strip().split(",")
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
    return pacsv.read_csv(path, convert_options=options)


def column(table: pa.Table, name: str, dtype: type = str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist(), dtype=dtype)


def data_files(root: Path) -> dict[str, bytes]:
    """Every generated file except the day manifests (their ``created_at`` is the wall clock)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def day_log(out: Path, date: str) -> dict[str, np.ndarray]:
    raw = read_csv(out / date / "raw_sample.csv")
    return {name: column(raw, name) for name in CONTRACT["raw_sample.csv"]}


# --- layout and determinism ----------------------------------------------------------------


def test_same_settings_write_byte_identical_files(simulated, tmp_path):
    out, _ = simulated
    run_simulate(small_settings(), tmp_path, progress=False)
    first, second = data_files(out), data_files(tmp_path)
    assert sorted(first) == sorted(second)
    assert len(first) == 4 * len(DATES) + len(DATES) + 1  # CSVs, truth per day, world.npz
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_writes_other_logs(simulated, tmp_path):
    out, _ = simulated
    run_simulate(small_settings(seed=12, days=1), tmp_path, progress=False)
    name = f"{DATES[0]}/raw_sample.csv"
    assert (out / name).read_bytes() != (tmp_path / name).read_bytes()


def test_a_shorter_run_is_the_start_of_a_longer_one(simulated, tmp_path):
    """Days and new ads come from their own random streams: adding days never rewrites history."""
    out, _ = simulated
    run_simulate(small_settings(days=2), tmp_path, progress=False)
    longer = data_files(out)
    for name, content in data_files(tmp_path).items():
        if name != "_truth/world.npz":
            assert longer[name] == content, name


def test_day_folders_have_exactly_the_contract_columns(simulated):
    out, summary = simulated
    assert [d.date for d in summary.days] == DATES
    for date in DATES:
        assert sorted(p.name for p in (out / date).iterdir()) == sorted(
            [*CONTRACT, "manifest.json"]
        )
        for name, columns in CONTRACT.items():
            assert read_csv(out / date / name).column_names == columns, (date, name)
        truth = pq.read_table(out / "_truth" / f"{date}.parquet")
        assert truth.schema == pa.schema(
            [("impression_id", pa.string()), ("p_click", pa.float64())]
        )


def test_raw_sample_values_follow_the_contract(simulated):
    out, _ = simulated
    seen_ids: list[np.ndarray] = []
    for date in DATES:
        log = day_log(out, date)
        stamp = log["time_stamp"].astype(np.int64)
        start = int(dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC).timestamp())
        assert stamp.min() >= start and stamp.max() < start + 86_400  # unix seconds, that UTC day
        assert (np.diff(stamp) >= 0).all()  # logged in time order
        clk, nonclk = log["clk"].astype(int), log["nonclk"].astype(int)
        assert set(np.unique(clk)) == {0, 1}
        assert (nonclk == 1 - clk).all()
        for name, prefix in (
            ("impression_id", "i"),
            ("user", "u"),
            ("adgroup_id", "a"),
            ("pid", "p"),
        ):
            assert np.strings.startswith(log[name], prefix).all(), name
        seen_ids.append(log["impression_id"])
    every_id = np.concatenate(seen_ids)
    assert len(np.unique(every_id)) == len(every_id)  # unique across days


def test_side_tables_hold_taobao_profile_codes(simulated):
    out, _ = simulated
    users = read_csv(out / DATES[0] / "user_profile.csv")
    allowed = {
        "final_gender_code": {"1", "2"},
        "age_level": {str(v) for v in range(7)},
        "pvalue_level": {"1", "2", "3"},
        "shopping_level": {"1", "2", "3"},
        "occupation": {"0", "1"},
        "new_user_class_level": {"1", "2", "3", "4"},
    }
    for name, values in allowed.items():
        assert set(column(users, name)) == values, name
    placements = read_csv(out / DATES[0] / "placement_feature.csv")
    assert set(column(placements, "position")) == {"1", "2", "3", "4", "5"}
    assert set(column(placements, "slot_size")) <= {"320x50", "300x250", "728x90", "native"}
    ads = read_csv(out / DATES[0] / "ad_feature.csv")
    assert (column(ads, "price", float) > 0).all() and (column(ads, "bid", float) > 0).all()
    for name, prefix in (("cate_id", "cat"), ("campaign_id", "cmp"), ("customer", "adv")):
        assert np.strings.startswith(column(ads, name), prefix).all()


def test_every_logged_entity_is_in_that_days_side_tables(simulated):
    out, _ = simulated
    for date in DATES:
        log = day_log(out, date)
        ads = set(column(read_csv(out / date / "ad_feature.csv"), "adgroup_id"))
        placements = set(column(read_csv(out / date / "placement_feature.csv"), "pid"))
        users = set(column(read_csv(out / date / "user_profile.csv"), "userid"))
        assert set(log["adgroup_id"]) <= ads
        assert set(log["pid"]) <= placements
        assert set(log["user"]) <= users


def test_truth_has_one_row_per_impression_in_the_same_order(simulated):
    out, summary = simulated
    for date, day in zip(DATES, summary.days, strict=True):
        truth = pq.read_table(out / "_truth" / f"{date}.parquet")
        log = day_log(out, date)
        assert truth.num_rows == len(log["impression_id"]) == day.impressions == 20_000
        assert (column(truth, "impression_id") == log["impression_id"]).all()
        p = column(truth, "p_click", float)
        assert ((p > 0) & (p < 1)).all()


# --- the planted ground truth -----------------------------------------------------------------


def test_world_file_reproduces_every_logged_probability(simulated, world):
    """world.npz alone gives the true p of any (user, placement, ad, hour), as evaluation needs."""
    out, _ = simulated
    for date in DATES:
        log = day_log(out, date)
        hour = (log["time_stamp"].astype(np.int64) % 86_400) // 3600
        p = true_click_probability(
            world,
            index_of(world, "user", log["user"]),
            index_of(world, "placement", log["pid"]),
            index_of(world, "ad", log["adgroup_id"]),
            hour,
        )
        truth = pq.read_table(out / "_truth" / f"{date}.parquet")
        np.testing.assert_allclose(p, column(truth, "p_click", float), rtol=1e-12)


def test_overall_ctr_is_near_the_target(simulated):
    _, summary = simulated
    target = small_settings().target_ctr
    assert summary.impressions == 60_000
    assert abs(summary.ctr - target) < 0.15 * target
    for day in summary.days:
        assert abs(day.mean_p_click - target) < 0.1 * target


def test_true_probability_separates_clicks(simulated):
    out, summary = simulated
    p = np.concatenate(
        [column(pq.read_table(out / "_truth" / f"{d}.parquet"), "p_click", float) for d in DATES]
    )
    clk = np.concatenate([day_log(out, d)["clk"].astype(int) for d in DATES])
    oracle = roc_auc_score(clk, p)
    assert oracle > 0.7
    assert summary.oracle_auc == pytest.approx(oracle, abs=1e-9)


def test_roc_auc_matches_a_hand_count_with_ties():
    # pairs (pos, neg): 0.35>0.1 ✓, 0.35<0.4 ✗, 0.8 beats both ✓✓, the tie 0.4=0.4 counts ½
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx((1 + 0 + 2 + 1.5) / 6)


def test_higher_positions_click_more(simulated, world):
    out, _ = simulated
    assert list(POSITION_EFFECT) == sorted(POSITION_EFFECT, reverse=True)
    log = {k: np.concatenate([day_log(out, d)[k] for d in DATES]) for k in ("pid", "clk")}
    position = world.placement_position[index_of(world, "placement", log["pid"])]
    clk = log["clk"].astype(int)
    assert clk[position == 1].mean() > 1.3 * clk[position == 5].mean()


def test_logged_clicks_carry_the_planted_position_effect(simulated, world):
    """Clicks over what a position-free model expects fall with position by ~exp(effect)."""
    out, _ = simulated
    p_click = np.concatenate(
        [column(pq.read_table(out / "_truth" / f"{d}.parquet"), "p_click", float) for d in DATES]
    )
    log = {k: np.concatenate([day_log(out, d)[k] for d in DATES]) for k in ("pid", "clk")}
    position = world.placement_position[index_of(world, "placement", log["pid"])]
    effect = np.asarray(POSITION_EFFECT)[position - 1]
    logit = np.log(p_click / (1 - p_click))
    expected_without_position = 1 / (1 + np.exp(-(logit - effect)))
    clk = log["clk"].astype(int)
    lift = [
        clk[position == k].sum() / expected_without_position[position == k].sum() for k in (1, 5)
    ]
    assert lift[0] / lift[1] == pytest.approx(
        np.exp(POSITION_EFFECT[0] - POSITION_EFFECT[4]), rel=0.25
    )


def test_better_matching_impressions_click_more(simulated, world):
    """The user×context×ad signal: the latent match term alone orders click rates."""
    out, _ = simulated
    log = {
        k: np.concatenate([day_log(out, d)[k] for d in DATES])
        for k in ("user", "pid", "adgroup_id", "clk")
    }
    u = index_of(world, "user", log["user"])
    p = index_of(world, "placement", log["pid"])
    a = index_of(world, "ad", log["adgroup_id"])
    context = world.user_factor[u].astype(float) + world.placement_factor[p]
    match = np.einsum("nd,nd->n", context, world.ad_factor[a])
    low, high = np.quantile(match, [0.25, 0.75])
    clk = log["clk"].astype(int)
    assert clk[match >= high].mean() > 1.5 * clk[match <= low].mean()


def test_the_logging_policy_targets(simulated, world):
    """Logged ads beat a random live ad shown to the same user, placement and hour."""
    out, _ = simulated
    log = day_log(out, DATES[0])
    users = index_of(world, "user", log["user"])
    placements = index_of(world, "placement", log["pid"])
    hour = (log["time_stamp"].astype(np.int64) % 86_400) // 3600
    logged = true_click_probability(
        world, users, placements, index_of(world, "ad", log["adgroup_id"]), hour
    )
    random_ads = np.random.default_rng(0).choice(live_ads(world, 0), len(users))
    random = true_click_probability(world, users, placements, random_ads, hour)
    assert logged.mean() > 1.5 * random.mean()


def test_the_best_ad_beats_a_random_live_ad_by_far(world):
    rng = np.random.default_rng(0)
    users = rng.integers(0, world.num_users, 2_000)
    placements = rng.integers(0, 60, 2_000)
    ads = live_ads(world, 0)
    random_p = true_click_probability(world, users, placements, rng.choice(ads, 2_000), 12)
    _, best_p = best_ads(world, users, placements, 12, 1, day=0)
    assert best_p[:, 0].mean() > 5 * random_p.mean()


def test_best_ads_match_brute_force_over_live_ads(world):
    users, placements = np.array([0, 17, 256]), np.array([3, 3, 59])
    day = DATES[2]
    top, top_p = best_ads(world, users, placements, 20, 7, day=day)
    live = live_ads(world, day)
    assert len(live) < world.num_ads  # some ads retired, some not born yet
    for i in range(len(users)):
        p = true_click_probability(world, users[i], placements[i], live, 20)
        expected = live[np.argsort(-p, kind="stable")[:7]]
        assert top[i].tolist() == expected.tolist()
        np.testing.assert_allclose(top_p[i], np.sort(p)[::-1][:7], rtol=1e-12)
    assert np.isin(top, live).all()


def test_a_few_ads_are_best_for_almost_everyone(world):
    """Heavy-tailed quality: similarity retrieval misses these universally clicked ads."""
    rng = np.random.default_rng(1)
    users = rng.integers(0, world.num_users, 400)
    placements = rng.integers(0, 60, 400)
    top, _ = best_ads(world, users, placements, 12, 10, day=0)
    ads, counts = np.unique(top, return_counts=True)
    star = ads[np.argmax(counts)]
    assert counts.max() / len(users) > 0.4  # in the top 10 of more than 40% of users
    live = live_ads(world, 0)
    assert world.ad_quality[star] >= np.quantile(world.ad_quality[live], 0.99)


def test_new_ads_and_placements_appear_on_later_days(simulated, world):
    out, summary = simulated
    settings = small_settings()
    for day, date in enumerate(DATES[1:], start=1):
        ads_today = set(column(read_csv(out / date / "ad_feature.csv"), "adgroup_id"))
        ads_before = set(column(read_csv(out / DATES[day - 1] / "ad_feature.csv"), "adgroup_id"))
        born = set(world.ad_ids[world.ad_birth == day])
        assert (
            len(born)
            == round(settings.new_ads_per_day * settings.num_ads)
            == summary.days[day].new_ads
        )
        assert born <= ads_today and not born & ads_before
        assert ads_before - ads_today  # and some ads retired
        pids_today = set(column(read_csv(out / date / "placement_feature.csv"), "pid"))
        pids_before = set(column(read_csv(out / DATES[day - 1] / "placement_feature.csv"), "pid"))
        new_pids = pids_today - pids_before
        assert len(new_pids) == round(settings.new_placements_per_day * settings.num_placements)
        log = day_log(out, date)
        assert set(log["adgroup_id"]) & born  # cold-start ads get traffic on their first day
        assert set(log["pid"]) & new_pids


def test_a_new_ads_features_predict_its_latent_factor(world):
    """Cold start is learnable: category and brand explain most of a new ad's factor."""
    old = world.ad_birth == 0
    new = ~old
    keys = world.ad_cate.astype(np.int64) * 1_000_000 + world.ad_brand
    predicted = np.zeros_like(world.ad_factor[new], dtype=float)
    for i, key in enumerate(keys[new]):
        same = old & (keys == key)
        same = same if same.any() else old & (world.ad_cate == world.ad_cate[new][i])
        predicted[i] = world.ad_factor[same].mean(axis=0)
    residual = ((world.ad_factor[new] - predicted) ** 2).sum()
    total = ((world.ad_factor[new] - world.ad_factor[old].mean(axis=0)) ** 2).sum()
    assert 1 - residual / total > 0.6


def test_index_of_maps_ids_and_rejects_unknown_ones(world):
    assert index_of(world, "ad", ["a0", "a12"]).tolist() == [0, 12]
    assert index_of(world, "user", world.user_ids[[5, 2]]).tolist() == [5, 2]
    for bad in (["a999999"], ["u1"], ["a01"], ["a"]):
        with pytest.raises(KeyError):
            index_of(world, "ad", bad)


def test_a_day_without_live_ads_is_refused(tmp_path):
    settings = small_settings(days=3, new_ads_per_day=0.0, ads_retired_per_day=1.0)
    with pytest.raises(ValueError, match="no ad is live on day 1"):
        run_simulate(settings, tmp_path, progress=False)
    assert not (tmp_path / DATES[1]).exists()


def test_summary_rows_add_up_the_days(simulated):
    _, summary = simulated
    rows = summary.as_rows()
    assert rows["impressions"] == sum(d.impressions for d in summary.days) == 60_000
    assert rows["clicks"] == sum(d.clicks for d in summary.days)
    assert rows["new_ads"] == 2 * round(0.05 * 1_500)
