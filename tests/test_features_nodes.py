"""Features nodes on tiny hand-built frames with hand-computed answers."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from models.feature_spec import MISSING, Feature
from pipelines.features import nodes

pytestmark = pytest.mark.spark

D1, D2, D3, D4, D5 = (dt.date(2024, 1, day) for day in (1, 2, 3, 4, 5))


def _events(spark, rows):
    """(event_id, date, user_id, label) rows as a frame."""
    return spark.createDataFrame(rows, "event_id string, date date, user_id string, label int")


def _numeric(name: str, log1p: bool = False) -> Feature:
    return Feature(name, "ad", "numeric", "double", "side", log1p=log1p)


def test_vocabulary_keeps_values_seen_min_count_times_most_frequent_first_ties_by_value(spark):
    values = ["b"] * 3 + ["a"] * 3 + ["d"] * 2 + ["c"] + ["x\ny"] * 4
    rows = spark.createDataFrame([(v, "k") for v in values], "f string, g string")

    entries = nodes.vocabulary(nodes.value_counts(rows, ["f", "g"]), min_count=2)
    got = [(r["feature"], r["value"], r["count"]) for r in entries.collect()]

    # "c" is seen once (< min_count); a value with a line break cannot be one line of a file.
    assert got == [("f", "a", 3), ("f", "b", 3), ("f", "d", 2), ("g", "k", 13)]


def test_weighted_counts_and_stats_equal_those_of_the_rows_they_stand_for(spark):
    # An entity-day table: (ad, brand, price, impressions that day) stands for 3 + 1 rows.
    per_day = spark.createDataFrame(
        [("a1", "x", 1.0, 3), ("a2", "y", 5.0, 1), ("a3", "z", None, 0)],
        "ad_id string, ad__brand string, ad__price double, impressions long",
    )
    rows = spark.createDataFrame(
        [("a1", "x", 1.0)] * 3 + [("a2", "y", 5.0)],
        "ad_id string, ad__brand string, ad__price double",
    )
    price = [_numeric("ad__price")]

    weighted = nodes.value_counts(per_day, ["ad_id", "ad__brand"], weight="impressions")
    plain = nodes.value_counts(rows, ["ad_id", "ad__brand"])
    assert sorted(map(tuple, weighted.filter("count > 0").collect())) == sorted(
        map(tuple, plain.collect())
    )
    w = nodes.numeric_stats(per_day, price, weight="impressions").collect()[0].asDict()
    p = nodes.numeric_stats(rows, price).collect()[0].asDict()
    for stat in ("count", "mean", "std", "min", "max"):
        assert w[stat] == pytest.approx(p[stat])
    assert (w["count"], w["mean"], w["std"], w["min"], w["max"]) == (
        4,
        pytest.approx(2.0),
        pytest.approx(math.sqrt(3.0)),
        1.0,
        5.0,
    )


def test_numeric_stats_are_exact_ignore_nulls_and_apply_log1p_to_clamped_values(spark):
    e = math.e
    rows = spark.createDataFrame(
        [(0.0, 0.0), (1.0, e - 1), (3.0, e * e - 1), (None, -5.0)], "x double, y double"
    )

    stats = {
        r["feature"]: r.asDict()
        for r in nodes.numeric_stats(rows, [_numeric("x"), _numeric("y", log1p=True)]).collect()
    }

    # x: 0, 1, 3 (null ignored): mean 4/3, population std sqrt(14/9).
    assert stats["x"]["count"] == 3
    assert stats["x"]["mean"] == pytest.approx(4 / 3)
    assert stats["x"]["std"] == pytest.approx(math.sqrt(14 / 9))
    assert (stats["x"]["min"], stats["x"]["max"]) == (0.0, 3.0)
    # y: log1p(max(y, 0)) = 0, 1, 2, 0 → mean 0.75, std sqrt(0.6875).
    assert stats["y"]["count"] == 4
    assert stats["y"]["mean"] == pytest.approx(0.75)
    assert stats["y"]["std"] == pytest.approx(math.sqrt(0.6875))
    assert (stats["y"]["min"], stats["y"]["max"]) == (0.0, pytest.approx(2.0))
    assert nodes.numeric_default(1.0, log1p=True) == pytest.approx(e - 1)
    assert nodes.numeric_default(1.5, log1p=False) == 1.5


def test_history_by_day_counts_only_strictly_earlier_days_and_smooths_toward_the_days_prior(
    spark,
):
    # u1: day 1 → 2 impressions, 1 click; day 2 → 3, 0; day 4 → 1, 1.  u2: day 2 → 1, 1.
    events = _events(
        spark,
        [
            ("e1", D1, "u1", 1),
            ("e2", D1, "u1", 0),
            ("e3", D2, "u1", 0),
            ("e4", D2, "u1", 0),
            ("e5", D2, "u1", 0),
            ("e6", D4, "u1", 1),
            ("e7", D2, "u2", 1),
        ],
    )
    priors = {D1: 0.5, D2: 0.25, D4: 0.1}

    daily = nodes.daily_counts(events, "user_id")
    history = nodes.history_by_day(daily, "user_id", "user__", priors, strength=4.0)
    got = {
        (r["user_id"], r["date"]): (
            r["user__hist_impressions"],
            r["user__hist_clicks"],
            r["user__hist_ctr"],
        )
        for r in history.collect()
    }

    assert got[("u1", D1)] == (0.0, 0.0, pytest.approx(0.5))  # no history: exactly the prior
    assert got[("u1", D2)] == (2.0, 1.0, pytest.approx((1 + 4 * 0.25) / (2 + 4)))
    assert got[("u1", D4)] == (5.0, 1.0, pytest.approx((1 + 4 * 0.1) / (5 + 4)))
    assert got[("u2", D2)] == (0.0, 0.0, pytest.approx(0.25))
    before = {
        r["user_id"]: (r["hist_impressions"], r["hist_clicks"])
        for r in nodes.history_before(daily, "user_id", D4).collect()
    }
    assert before == {"u1": (5, 1), "u2": (1, 1)}


def test_history_of_a_day_does_not_change_when_that_days_labels_flip(spark):
    base = [("e1", D1, "u1", 0), ("e2", D2, "u1", 1), ("e3", D2, "u1", 1), ("e4", D3, "u1", 0)]
    flipped = [(e, d, u, 1 - y) if d == D2 else (e, d, u, y) for e, d, u, y in base]
    priors = {D1: 0.2, D2: 0.2, D3: 0.2}

    def day_two(rows):
        daily = nodes.daily_counts(_events(spark, rows), "user_id")
        history = nodes.history_by_day(daily, "user_id", "user__", priors, strength=1.0)
        return {r["date"]: tuple(r)[3:] for r in history.collect()}

    a, b = day_two(base), day_two(flipped)
    assert a[D2] == b[D2] == (1.0, 0.0, pytest.approx(0.1))
    assert a[D3] != b[D3]  # the next day does see day 2


def test_prior_ctr_comes_from_days_before_each_day_and_ignores_the_target_day():
    totals = {D1: (10, 1), D2: (10, 3), D3: (10, 10)}

    global_ctr, priors = nodes.prior_ctr_by_day(totals, target=D3)

    assert global_ctr == pytest.approx(4 / 20)  # day 3 (the target) is not counted
    assert priors == {D1: pytest.approx(0.2), D2: pytest.approx(0.1), D3: pytest.approx(0.2)}


def test_side_features_join_as_of_each_day_and_absent_entities_get_missing(spark):
    brand = Feature("ad__brand", "ad", "categorical", "string", "side")
    price = _numeric("ad__price")
    raw = spark.createDataFrame(
        [
            ("a1", "old", 1.0, D1),
            ("a1", "new", 2.0, D3),
            ("a2", "", 5.0, D3),
            ("a2", "zzz", 6.0, D3),  # a key listed twice keeps its greatest row
        ],
        "ad_id string, ad__brand string, ad__price double, date date",
    )
    side = nodes.canonical_side(raw, "ad_id", [brand, price])
    as_of = nodes.snapshot_as_of([D1, D2, D3, D4], [D1, D3])
    assert as_of == {D1: D1, D2: D1, D3: D3, D4: D3}
    assert nodes.snapshot_as_of([dt.date(2023, 12, 31)], [D1]) == {}

    frame = spark.createDataFrame(
        [("a1", D2), ("a1", D4), ("a2", D2), ("a2", D3)], "ad_id string, date date"
    )
    joined = nodes.join_side_as_of(frame, side, "ad_id", [brand, price], as_of)
    got = {(r["ad_id"], r["date"]): (r["ad__brand"], r["ad__price"]) for r in joined.collect()}

    assert got == {
        ("a1", D2): ("old", 1.0),
        ("a1", D4): ("new", 2.0),
        ("a2", D2): (MISSING, None),  # a2 is not in the day-1 snapshot
        ("a2", D3): ("zzz", 6.0),
    }


def test_canonical_events_types_values_and_maps_null_or_empty_categoricals_to_missing(spark):
    raw = spark.createDataFrame(
        [
            ("e1", dt.datetime(2024, 1, 1, 13), "u", "p", "a", 1, 13, "", "2.5", D1),
            ("e2", dt.datetime(2024, 1, 1, 14), "u", "p", "a", 0, None, None, None, D1),
        ],
        "event_id string, event_time timestamp, user_id string, placement_id string, "
        "ad_id string, label int, ctx__hour int, user__os string, ad__w string, date date",
    )
    features = [
        Feature("ctx__hour", "context", "categorical", "string", "events"),
        Feature("user__os", "user", "categorical", "string", "events"),
        Feature("ad__w", "ad", "numeric", "double", "events"),
        Feature("ad__absent", "ad", "categorical", "string", "events"),
    ]

    rows = nodes.canonical_events(raw, features).orderBy("event_id").collect()

    assert [(r["ctx__hour"], r["user__os"], r["ad__w"], r["ad__absent"]) for r in rows] == [
        ("13", MISSING, 2.5, MISSING),
        (MISSING, MISSING, None, MISSING),
    ]
    assert rows[0]["date"] == D1


def test_latest_values_take_the_latest_event_and_break_time_ties_by_event_id(spark):
    t1, t2 = dt.datetime(2024, 1, 1, 8), dt.datetime(2024, 1, 2, 8)
    events = spark.createDataFrame(
        [("e1", t1, "u1", "ios"), ("e3", t2, "u1", "web"), ("e2", t2, "u1", "android")],
        "event_id string, event_time timestamp, user_id string, user__os string",
    )

    got = nodes.latest_values(events, "user_id", ["user__os"]).collect()

    assert [(r["user_id"], r["user__os"]) for r in got] == [("u1", "web")]


def test_entity_table_lists_entities_without_traffic_with_zero_history_and_the_prior(spark):
    keys = spark.createDataFrame([("a1",), ("a2",), ("a2",)], "ad_id string")
    profile = spark.createDataFrame([("a1", "b1"), ("a2", "b2")], "ad_id string, ad__brand string")
    totals = spark.createDataFrame(
        [("a1", 8, 2)], "ad_id string, hist_impressions long, hist_clicks long"
    )

    table = nodes.entity_table(keys, [profile], totals, "ad_id", "ad__", 0.1, strength=2.0)
    got = {r["ad_id"]: tuple(r)[1:] for r in table.collect()}

    assert got == {
        "a1": ("b1", 8.0, 2.0, pytest.approx((2 + 2 * 0.1) / (8 + 2))),
        "a2": ("b2", 0.0, 0.0, pytest.approx(0.1)),
    }


def test_ad_log_q_is_the_log_click_share_and_a_proper_distribution(spark):
    clicked = spark.createDataFrame(
        [("e1", "a"), ("e2", "a"), ("e3", "a"), ("e4", "b")], "event_id string, ad_id string"
    )

    got = {
        r["event_id"]: (r["ad_id"], r["ad_log_q"]) for r in nodes.with_ad_log_q(clicked).collect()
    }

    assert got["e1"][1] == pytest.approx(math.log(3 / 4))
    assert got["e4"][1] == pytest.approx(math.log(1 / 4))
    per_ad = {ad: q for ad, q in got.values()}
    assert sum(math.exp(q) for q in per_ad.values()) == pytest.approx(1.0)


def test_popularity_ranks_by_clicks_then_impressions_then_id_overall_and_per_placement(spark):
    rows = spark.createDataFrame(
        [
            ("p1", "a", 1),
            ("p1", "a", 1),
            ("p1", "b", 1),
            ("p1", "b", 1),
            ("p1", "b", 0),
            ("p1", "c", 0),
            ("p2", "c", 1),
            ("p2", "d", 1),
            ("p2", "e", 1),
        ],
        "placement_id string, ad_id string, label int",
    )

    got = nodes.popularity(rows, top_n=2).collect()
    lists: dict[str, list] = {}
    for r in sorted(got, key=lambda r: (r["placement_id"], r["rank"])):
        lists.setdefault(r["placement_id"], []).append((r["ad_id"], r["clicks"], r["rank"]))

    assert lists == {
        "__all__": [("b", 2, 1), ("a", 2, 2)],  # b wins the tie on impressions
        "p1": [("b", 2, 1), ("a", 2, 2)],
        "p2": [("c", 1, 1), ("d", 1, 2)],  # a three-way tie falls back to the id
    }


def test_fill_missing_replaces_nulls_with_each_columns_default(spark):
    df = spark.createDataFrame([(None, None), ("x", 2.0)], "c string, n double")

    got = nodes.fill_missing(df, {"c": MISSING, "n": 1.5, "absent": 0.0}).collect()

    assert [tuple(r) for r in got] == [(MISSING, 1.5), ("x", 2.0)]


def _planted_daily(spark):
    """Daily counts (user, day, impressions, clicks): u1 every day, u2 on day 1, day 4 and D5.

    Log days D1-D4 (training), D5 the target day."""
    return spark.createDataFrame(
        [
            ("u1", D1, 4, 1),
            ("u1", D2, 2, 0),
            ("u1", D3, 6, 3),
            ("u1", D4, 8, 2),
            ("u1", D5, 1, 0),
            ("u2", D1, 10, 5),
            ("u2", D4, 1, 0),
            ("u2", D5, 1, 1),
        ],
        "user_id string, date date, impressions long, clicks long",
    )


def test_lookback_days_count_the_log_days_of_each_window_not_its_length():
    # Day 3 is missing from the log: it does not count in the windows that cover it.
    got = nodes.lookback_days([D1, D2, D4], [D1, D2, D3, D4, D5], history_days=2)

    assert got == {D1: 0, D2: 1, D3: 2, D4: 1, D5: 1}


def test_windowed_history_is_per_log_day_of_the_last_n_days_and_the_ctr_over_them(spark):
    daily = _planted_daily(spark)
    priors = {D1: 0.1, D2: 0.2, D3: 0.3, D4: 0.4, D5: 0.5}
    window_days = nodes.lookback_days([D1, D2, D3, D4], [D1, D2, D3, D4, D5], history_days=2)

    history = nodes.history_by_day(
        daily, "user_id", "user__", priors, 2.0, history_days=2, window_days=window_days
    )
    got = {
        (r["user_id"], r["date"]): (
            r["user__hist_impressions"],
            r["user__hist_clicks"],
            pytest.approx(r["user__hist_ctr"]),
        )
        for r in history.collect()
    }

    # The first log day: an empty window, zero rates (no division by zero), the day's prior.
    assert got[("u1", D1)] == (0.0, 0.0, 0.1)
    # Day 2: only day 1 is in the log (1 day): rates = day 1's counts.
    assert got[("u1", D2)] == (4.0, 1.0, (1 + 2 * 0.2) / (4 + 2))
    # Day 3: days 1-2, 6 impressions and 1 click over 2 log days.
    assert got[("u1", D3)] == (3.0, 0.5, (1 + 2 * 0.3) / (6 + 2))
    # Day 4: days 2-3 (day 1 has left the window), 8 and 3 over 2 days.
    assert got[("u1", D4)] == (4.0, 1.5, (3 + 2 * 0.4) / (8 + 2))
    # u2 was absent on days 2-3: its day-4 window is empty although it has older traffic.
    assert got[("u2", D4)] == (0.0, 0.0, 0.4)
    # Day 5 (D): days 3-4; u2 absent on day 3 still divides by the window's 2 log days.
    assert got[("u1", D5)] == (7.0, 2.5, (5 + 2 * 0.5) / (14 + 2))
    assert got[("u2", D5)] == (0.5, 0.0, (0 + 2 * 0.5) / (1 + 2))


def test_entity_table_as_of_d_equals_the_training_definition_for_a_row_dated_d(spark):
    daily = _planted_daily(spark)
    priors = {D1: 0.1, D2: 0.2, D3: 0.3, D4: 0.4, D5: 0.5}
    window_days = nodes.lookback_days([D1, D2, D3, D4], [D1, D2, D3, D4, D5], history_days=2)
    offline = {
        r["user_id"]: tuple(r)[3:]
        for r in nodes.history_by_day(
            daily, "user_id", "user__", priors, 2.0, history_days=2, window_days=window_days
        )
        .filter(f"date = '{D5}'")
        .collect()
    }
    keys = spark.createDataFrame([("u1",), ("u2",), ("u3",)], "user_id string")

    totals = nodes.history_before(daily, "user_id", D5, history_days=2)
    table = nodes.entity_table(
        keys, [], totals, "user_id", "user__", 0.5, 2.0, window_days=window_days[D5]
    )
    online = {r["user_id"]: tuple(r)[1:] for r in table.collect()}

    assert {r["user_id"]: tuple(r)[1:] for r in totals.collect()} == {
        "u1": (14, 5),
        "u2": (1, 0),
    }
    for user in ("u1", "u2"):
        assert online[user] == pytest.approx(offline[user]), user
    assert online["u1"] == pytest.approx((7.0, 2.5, 6 / 16))
    # Known but without traffic in the window (here: at all): zero rates and the prior.
    assert online["u3"] == pytest.approx((0.0, 0.0, 0.5))
