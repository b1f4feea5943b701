"""``run_features`` end to end on small canonical partitions written here (contracts.md §2 layout),
checked against answers computed independently with pandas."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepclick import layout
from deepclick.layout import DayLayout
from deepclick.publish import current_version, verify
from deepclick.settings import FeatureSettings, Settings, SparkSettings
from models.feature_spec import FEATURE_TABLES, MISSING, ROLE_TABLE, load_feature_spec
from pipelines.features import runner
from pipelines.features.runner import FeaturesInputError, find_inputs, run_features

pytestmark = pytest.mark.spark


def build_features(settings: Settings, spark) -> Path:
    """What the lifecycle's features stage does for D: find the inputs, run, publish into D's
    features folder (``deepclick.layout``)."""
    inputs = find_inputs(layout.warehouse(settings.root), D, settings.features)
    return run_features(settings, inputs, DayLayout(settings.root, D).features, spark)


OLD, D1, D2, D3, D, LATER = (
    dt.date(2023, 12, 31),
    dt.date(2024, 1, 1),
    dt.date(2024, 1, 2),
    dt.date(2024, 1, 3),
    dt.date(2024, 1, 4),
    dt.date(2024, 1, 5),
)
TRAIN = [D1, D2, D3]
STRENGTH = 20.0
EVENT_FEATURES = [
    {"name": "ctx__hour", "role": "context", "kind": "categorical", "dtype": "int"},
    {"name": "ctx__dow", "role": "context", "kind": "categorical", "dtype": "int"},
    {"name": "user__device", "role": "user", "kind": "categorical", "dtype": "string"},
]
SIDE_FEATURES = {
    "ads": [
        {"name": "ad__brand", "role": "ad", "kind": "categorical", "dtype": "string"},
        {"name": "ad__price", "role": "ad", "kind": "numeric", "dtype": "double", "log1p": True},
    ],
    "users": [{"name": "user__age", "role": "user", "kind": "categorical", "dtype": "string"}],
    "placements": [
        {"name": "ctx__page", "role": "context", "kind": "categorical", "dtype": "string"}
    ],
}
KEYS = {"user": "user_id", "context": "placement_id", "ad": "ad_id"}
PREFIX = {"user": "user__", "context": "ctx__", "ad": "ad__"}
TABLES = list(FEATURE_TABLES)


# --- canonical inputs ------------------------------------------------------------------------


def write_partition(folder: Path, frame: pd.DataFrame, dataset: str, features: list) -> None:
    """One ``date=`` partition: Parquet + ``_manifest.json`` with dataset, features and counts."""
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "part-00000.parquet", index=False)
    manifest = {"dataset": dataset, "features": features, "counts": {"rows_written": len(frame)}}
    (folder / "_manifest.json").write_text(json.dumps(manifest))


def make_events(day: dt.date, n: int, seed: int, users: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp(day, tz="UTC")
    # Two events share each timestamp, so "latest value" needs its event_id tie-break.
    times = start + pd.to_timedelta(np.sort(rng.integers(0, 86_400, n // 2)).repeat(2), unit="s")
    return pd.DataFrame(
        {
            "event_id": [f"{day:%Y%m%d}-{i:03d}" for i in range(n)],
            "event_time": times.astype("datetime64[us, UTC]"),
            "user_id": rng.choice(users, n),
            "placement_id": rng.choice(["p1", "p2"], n),
            "ad_id": rng.choice(["a1", "a2", "a3"], n, p=[0.5, 0.3, 0.2]),
            "label": rng.binomial(1, 0.3, n).astype("int32"),
            "ctx__hour": times.hour.astype("int32"),
            "ctx__dow": times.dayofweek.astype("int32"),
            "user__device": rng.choice(["ios", "android", "web"], n),
        }
    )


def ads_snapshot(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["ad_id", "ad__brand", "ad__price"])


def toy_events() -> dict[dt.date, pd.DataFrame]:
    """An old day (outside a 3-day window), three training days, D (labels all 1: planted), and
    a later day that must be ignored. ``u9`` first appears on D."""
    users = ["u0", "u1", "u2", "u3", "u4"]
    events = {day: make_events(day, 40, i, users) for i, day in enumerate([OLD, *TRAIN, LATER])}
    events[D] = make_events(D, 20, 99, [*users, "u9"]).assign(label=np.int32(1))
    return events


def toy_side() -> dict[str, dict[dt.date, pd.DataFrame]]:
    """Ads change on D3 (a1's brand and price) and a4 arrives on D with no traffic; u4 has no
    profile; p3 has no traffic."""
    return {
        "ads": {
            D1: ads_snapshot([("a1", "b1", 10.0), ("a2", "b2", 20.0), ("a3", "b3", 30.0)]),
            D3: ads_snapshot([("a1", "b1new", 15.0), ("a2", "b2", 20.0), ("a3", "b3", 30.0)]),
            D: ads_snapshot(
                [("a1", "b1new", 15.0), ("a2", "b2", 20.0), ("a3", "b3", 30.0), ("a4", "b4", 40.0)]
            ),
        },
        "users": {
            D1: pd.DataFrame(
                {"user_id": ["u0", "u1", "u2", "u3"], "user__age": ["1", "2", "2", ""]}
            )
        },
        "placements": {
            D1: pd.DataFrame(
                {"placement_id": ["p1", "p2", "p3"], "ctx__page": ["home", "search", "cart"]}
            )
        },
    }


def write_warehouse(warehouse: Path, events: dict, side: dict, dataset: str = "toy") -> None:
    for day, frame in events.items():
        write_partition(warehouse / "events" / f"date={day}", frame, dataset, EVENT_FEATURES)
    for table, snapshots in side.items():
        for day, frame in snapshots.items():
            folder = warehouse / "side" / table / f"date={day}"
            write_partition(folder, frame, dataset, SIDE_FEATURES[table])


def set_labels(warehouse: Path, day: dt.date, labels) -> None:
    """Rewrite one events partition with other labels (everything else unchanged)."""
    path = warehouse / "events" / f"date={day}" / "part-00000.parquet"
    frame = pd.read_parquet(path)
    frame["label"] = np.asarray(labels, dtype="int32") if np.ndim(labels) else np.int32(labels)
    frame.to_parquet(path, index=False)


def toy_settings(root: Path, **features) -> Settings:
    return Settings(
        root=root,
        spark=SparkSettings(master="local[2]", shuffle_partitions=2, driver_memory="2g"),
        features=FeatureSettings(train_days=3, min_train_days=2, **features),
    )


def read_outputs(folder: Path) -> dict[str, pd.DataFrame]:
    """Every table of a features folder, rows in a canonical order."""
    outputs = {}
    for table in TABLES:
        frame = pd.read_parquet(folder / table)
        order = [c for c in ("event_id", "placement_id", "rank", "user_id", "ad_id") if c in frame]
        outputs[table] = frame.sort_values(order).reset_index(drop=True)
    return outputs


def copy_inputs(source: Path, target: Path) -> None:
    for part in ("events", "side"):
        if (source / part).exists():
            shutil.copytree(source / part, target / part)


# --- the reference answers -------------------------------------------------------------------


def expected_history(events: dict[dt.date, pd.DataFrame], days: list[dt.date]) -> pd.DataFrame:
    """Per event of ``days``: impressions and clicks of its user/placement/ad on earlier window
    days, and the smoothed CTR, computed with plain pandas."""
    window = [d for d in days if d in TRAIN]
    rows = pd.concat([events[d].assign(date=d) for d in days], ignore_index=True)
    past = pd.concat([events[d].assign(date=d) for d in window], ignore_index=True)
    totals = {d: (len(events[d]), int(events[d].label.sum())) for d in window}
    global_ctr = sum(c for _, c in totals.values()) / sum(n for n, _ in totals.values())

    def prior(day):
        earlier = [d for d in window if d < day]
        if not earlier:
            return global_ctr
        return sum(totals[d][1] for d in earlier) / sum(totals[d][0] for d in earlier)

    result = rows[["event_id", "date"]].copy()
    for role, key in KEYS.items():
        imps, clicks = [], []
        for ident, day in zip(rows[key], rows["date"], strict=True):
            seen = past[(past[key] == ident) & (past["date"] < day)]
            imps.append(float(len(seen)))
            clicks.append(float(seen.label.sum()))
        priors = np.array([prior(day) for day in rows["date"]])
        result[f"{PREFIX[role]}hist_impressions"] = imps
        result[f"{PREFIX[role]}hist_clicks"] = clicks
        result[f"{PREFIX[role]}hist_ctr"] = (np.array(clicks) + STRENGTH * priors) / (
            np.array(imps) + STRENGTH
        )
    return result.sort_values("event_id").reset_index(drop=True)


def history_columns() -> list[str]:
    return [f"{p}hist_{s}" for p in PREFIX.values() for s in ("impressions", "clicks", "ctr")]


def feature_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("label", "event_id", "date")]


# --- one published run shared by the checks below ----------------------------------------------


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory):
    settings = toy_settings(tmp_path_factory.mktemp("features") / "var")
    events, side = toy_events(), toy_side()
    write_warehouse(layout.warehouse(settings.root), events, side)
    folder = build_features(settings, spark)
    return settings, folder, events, read_outputs(folder)


def test_published_folder_has_every_output_and_a_manifest_that_counts_them(base):
    settings, folder, events, outputs = base

    assert folder == layout.warehouse(settings.root) / "features" / "20240104"
    assert current_version(folder.parent) == "20240104"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    manifest = verify(folder)  # every file matches its checksum
    for table in TABLES:
        assert manifest["counts"][table] == len(outputs[table]), table
    train_events = pd.concat([events[d] for d in TRAIN])
    assert manifest["counts"]["training/ranking"] == 120
    assert manifest["counts"]["training/retrieval"] == int(train_events.label.sum())
    assert manifest["counts"]["eval"] == 20
    assert manifest["target_day_has_events"] is True
    assert manifest["train_dates"] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert [(e["date"], e["rows"]) for e in manifest["inputs"]["events"]] == [
        ("2024-01-01", 40),
        ("2024-01-02", 40),
        ("2024-01-03", 40),
        ("2024-01-04", 20),
    ]
    # Per day the newest snapshot dated on or before it: D1 for days 1-2, D3 for day 3, D for D.
    assert [e["date"] for e in manifest["inputs"]["side"]["ads"]] == [
        "2024-01-01",
        "2024-01-03",
        "2024-01-04",
    ]
    assert manifest["metrics"]["global_ctr"] == pytest.approx(train_events.label.mean())
    ranking = outputs["training/ranking"]
    assert set(ranking["date"]) == set(TRAIN)  # the old day and the later day are not read


def test_feature_spec_loads_and_describes_every_column_with_its_vocabulary_and_stats(base):
    _, folder, events, outputs = base
    spec = load_feature_spec(folder)
    ranking = outputs["training/ranking"]

    assert spec.version == "20240104" and spec.dataset == "toy"
    assert spec.train_dates == ("2024-01-01", "2024-01-02", "2024-01-03")
    assert spec.names == feature_columns(ranking)
    assert [f.name for f in spec.features if f.is_id] == ["user_id", "placement_id", "ad_id"]
    assert {f.name: f.source for f in spec.features}["ad__brand"] == "side"
    assert {f.name: f.source for f in spec.features}["user__hist_ctr"] == "history"
    assert spec.feature("ctx__hour").request_time
    assert "ctx__hour" not in spec.entities["placement"].features
    assert spec.entities["ad"].features == (
        "ad__brand",
        "ad__price",
        "ad__hist_impressions",
        "ad__hist_clicks",
        "ad__hist_ctr",
    )
    # Vocabulary: training values seen >= 2 times, most frequent first, ties by value.
    for feature in spec.categorical:
        counts = ranking[feature.name].value_counts()
        kept = sorted(
            ((v, n) for v, n in counts.items() if n >= 2), key=lambda item: (-item[1], item[0])
        )
        assert spec.vocabulary(feature.name) == [v for v, _ in kept], feature.name
        assert feature.vocabulary_size == len(kept) and feature.oov_buckets == 1
    assert spec.vocabulary("ctx__hour")[0].isdigit()  # ints become strings
    # Numeric statistics equal those of the training rows (after log1p when flagged).
    for feature in spec.numeric:
        values = ranking[feature.name].to_numpy()
        values = np.log1p(np.maximum(values, 0)) if feature.log1p else values
        assert feature.mean == pytest.approx(values.mean()), feature.name
        assert feature.std == pytest.approx(values.std()), feature.name
        assert feature.min == pytest.approx(values.min()), feature.name
        assert feature.max == pytest.approx(values.max()), feature.name
    assert spec.feature("ad__price").log1p and spec.feature("ad__hist_clicks").log1p
    assert spec.global_ctr == pytest.approx(pd.concat([events[d] for d in TRAIN]).label.mean())
    assert spec.feature("user__hist_ctr").default == pytest.approx(spec.global_ctr)


def test_history_features_are_exact_counts_of_earlier_window_days_only(base):
    _, _, events, outputs = base

    expected = expected_history(events, [*TRAIN, D])
    got = pd.concat([outputs["training/ranking"], outputs["eval"]]).sort_values("event_id")
    got = got.reset_index(drop=True)

    assert list(got["event_id"]) == list(expected["event_id"])
    for column in history_columns():
        np.testing.assert_allclose(got[column], expected[column], err_msg=column)
    # Rows of the first window day have no history at all; the old day is outside the window.
    first = got[got["date"] == D1]
    assert (first["user__hist_impressions"] == 0).all()


def test_side_features_are_taken_as_of_each_rows_own_day(base):
    _, _, _, outputs = base
    rows = pd.concat([outputs["training/ranking"], outputs["eval"]])
    a1 = rows[rows["ad_id"] == "a1"].groupby("date")[["ad__brand", "ad__price"]].first()

    assert a1.loc[D1].tolist() == ["b1", 10.0]
    assert a1.loc[D2].tolist() == ["b1", 10.0]
    assert a1.loc[D3].tolist() == ["b1new", 15.0]  # the D3 snapshot
    assert a1.loc[D].tolist() == ["b1new", 15.0]
    assert set(rows.loc[rows["user_id"] == "u4", "user__age"]) == {MISSING}  # no profile
    assert set(rows.loc[rows["user_id"] == "u3", "user__age"]) == {MISSING}  # empty value


def test_entity_tables_hold_every_known_entity_with_history_before_d(base):
    _, folder, events, outputs = base
    spec = load_feature_spec(folder)
    past = pd.concat([events[d] for d in TRAIN])
    ads = outputs["entities/ads"].set_index("ad_id")

    # a4 is only in the side snapshot of D: listed, zero history, the prior CTR.
    assert sorted(ads.index) == ["a1", "a2", "a3", "a4"]
    assert ads.loc["a4", ["ad__hist_impressions", "ad__hist_clicks"]].tolist() == [0.0, 0.0]
    assert ads.loc["a4", "ad__hist_ctr"] == pytest.approx(spec.global_ctr)
    assert ads.loc["a4", "ad__brand"] == "b4" and ads.loc["a1", "ad__brand"] == "b1new"
    for ad, group in past.groupby("ad_id"):
        n, c = len(group), int(group.label.sum())
        assert ads.loc[ad, "ad__hist_impressions"] == n
        assert ads.loc[ad, "ad__hist_ctr"] == pytest.approx(
            (c + STRENGTH * spec.global_ctr) / (n + STRENGTH)
        )
    placements = outputs["entities/placements"].set_index("placement_id")
    assert placements.loc["p3", "ctx__hist_impressions"] == 0.0
    users = outputs["entities/users"].set_index("user_id")
    assert "u9" not in users.index  # first seen on D: not known before D
    # Event-row profile features: the value of the user's latest event (ties: greatest id).
    latest = past.sort_values(["event_time", "event_id"]).groupby("user_id").last()
    assert users["user__device"].to_dict() == latest["user__device"].to_dict()
    assert list(outputs["entities/users"].columns) == ["user_id", *spec.entities["user"].features]


def test_retrieval_set_and_popularity_are_built_from_the_clicks_of_the_window(base):
    _, _, events, outputs = base
    past = pd.concat([events[d] for d in TRAIN])
    clicked = past[past.label == 1]
    retrieval = outputs["training/retrieval"]

    assert sorted(retrieval["event_id"]) == sorted(clicked["event_id"])
    share = clicked["ad_id"].value_counts(normalize=True)
    np.testing.assert_allclose(retrieval["ad_log_q"], np.log(share[retrieval["ad_id"]].to_numpy()))
    per_ad = retrieval.drop_duplicates("ad_id")["ad_log_q"]
    assert np.exp(per_ad).sum() == pytest.approx(1.0)
    popularity = outputs["popularity"]
    assert set(popularity["placement_id"]) == {"__all__", "p1", "p2"}
    for placement, rows in [("__all__", past), *past.groupby("placement_id")]:
        expected = (
            rows.groupby("ad_id")
            .agg(clicks=("label", "sum"), impressions=("label", "size"))
            .reset_index()
            .sort_values(["clicks", "impressions", "ad_id"], ascending=[False, False, True])
        )
        got = popularity[popularity["placement_id"] == placement].sort_values("rank")
        assert got["ad_id"].tolist() == expected["ad_id"].tolist(), placement
        assert got["clicks"].tolist() == expected["clicks"].tolist(), placement
        assert got["rank"].tolist() == list(range(1, len(expected) + 1)), placement


def test_rerun_with_flipped_labels_of_d_replaces_the_version_and_changes_only_eval_labels(
    base, spark, tmp_path
):
    settings, folder, _, outputs = base
    other = toy_settings(tmp_path / "var")
    shutil.copytree(
        layout.warehouse(settings.root), layout.warehouse(other.root)
    )  # inputs and the published version
    set_labels(layout.warehouse(other.root), D, 0)

    rerun = build_features(other, spark)
    again = read_outputs(rerun)

    assert sorted(p.name for p in rerun.parent.iterdir()) == ["20240104", "CURRENT"]
    verify(rerun)
    for table in TABLES:
        if table == "eval":
            continue
        pd.testing.assert_frame_equal(again[table], outputs[table], check_exact=True, obj=table)
    columns = feature_columns(outputs["eval"])
    pd.testing.assert_frame_equal(again["eval"][columns], outputs["eval"][columns])
    assert (outputs["eval"]["label"] == 1).all() and (again["eval"]["label"] == 0).all()
    assert (rerun / "feature_spec.json").read_text() == (folder / "feature_spec.json").read_text()
    for vocab in (folder / "vocab").iterdir():
        assert (rerun / "vocab" / vocab.name).read_text() == vocab.read_text()


def test_too_few_days_before_d_is_an_error_naming_d_and_the_dates_that_exist(settings):
    events = toy_events()
    write_warehouse(layout.warehouse(settings.root), {D1: events[D1], D: events[D]}, {})
    strict = settings.model_copy(update={"features": FeatureSettings(min_train_days=2)})

    with pytest.raises(FeaturesInputError) as error:
        build_features(strict, None)

    message = str(error.value)
    assert "2024-01-04" in message and "at least 2 day(s)" in message
    assert "dates with events in the warehouse: 2024-01-01, 2024-01-04" in message
    assert not (layout.warehouse(settings.root) / "features").exists()


def test_dataset_without_side_tables_takes_profiles_from_events_and_a_failure_publishes_nothing(
    settings, spark, monkeypatch
):
    events = toy_events()
    write_warehouse(
        layout.warehouse(settings.root), {d: events[d] for d in TRAIN}, {}, dataset="avazu"
    )
    cfg = settings.model_copy(update={"features": FeatureSettings(min_train_days=3)})

    folder = build_features(cfg, spark)  # D has no events
    outputs = read_outputs(folder)
    manifest = verify(folder)

    assert manifest["target_day_has_events"] is False and manifest["counts"]["eval"] == 0
    assert len(outputs["eval"]) == 0 and list(outputs["eval"].columns) == list(
        outputs["training/ranking"].columns
    )
    assert manifest["inputs"]["side"] == {}
    assert sorted(outputs["entities/ads"]["ad_id"]) == ["a1", "a2", "a3"]
    past = pd.concat([events[d] for d in TRAIN])
    latest = past.sort_values(["event_time", "event_id"]).groupby("user_id").last()
    users = outputs["entities/users"].set_index("user_id")
    assert users["user__device"].to_dict() == latest["user__device"].to_dict()
    assert set(load_feature_spec(folder).names) >= {"user__device", "ad__hist_ctr"}

    # A failure while writing leaves the published version as it was and no staging folder.
    def broken(df, path, files):
        path.mkdir(parents=True)
        (path / "part-00000.parquet").write_text("half a file")
        raise OSError("disk full")

    monkeypatch.setattr(runner, "_write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        build_features(cfg, spark)
    assert verify(folder)["checksums"] == manifest["checksums"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["20240104", "CURRENT"]


def test_a_manifest_feature_with_an_unknown_role_is_an_error_naming_it(tmp_path):
    events = toy_events()
    odd = [*EVENT_FEATURES, {"name": "dev__os", "role": "device", "kind": "categorical"}]
    for day in (D1, D2):
        write_partition(tmp_path / "events" / f"date={day}", events[day], "toy", odd)

    with pytest.raises(FeaturesInputError, match="'dev__os' has role 'device'"):
        runner.find_inputs(tmp_path, D, FeatureSettings())


def test_inputs_are_the_last_train_days_with_events_before_d_and_the_newest_snapshots(tmp_path):
    write_warehouse(tmp_path, toy_events(), toy_side())

    inputs = runner.find_inputs(tmp_path, D, FeatureSettings(train_days=2))

    assert inputs.window == [D2, D3]
    assert [p.day for p in inputs.events] == [D2, D3, D]
    assert inputs.sides["ad"].as_of == {D2: D1, D3: D3, D: D}
    assert inputs.sides["user"].as_of == {D2: D1, D3: D1, D: D1}
    assert [p.rows for p in inputs.events] == [40, 40, 20]


def test_the_window_is_the_datasets_own_days(tmp_path):
    """Issue 11 item 8: after ingesting another dataset into the same state root (Avazu 2014 next
    to the marketplace 2024, or another log on days just before D), each dataset's features see
    only that dataset's days, and D's events may not be built as another dataset."""
    write_warehouse(tmp_path, toy_events(), toy_side())
    other = {dt.date(2023, 12, 28): toy_events()[OLD], dt.date(2023, 12, 29): toy_events()[OLD]}
    write_warehouse(
        tmp_path, other, {"ads": {dt.date(2023, 12, 28): toy_side()["ads"][D1]}}, "avazu"
    )

    inputs = runner.find_inputs(tmp_path, D, FeatureSettings(train_days=30))
    assert inputs.dataset == "toy" and inputs.window == [OLD, *TRAIN]
    assert [p.day for p in inputs.sides["ad"].used] == [D1, D3, D]

    theirs = runner.find_inputs(tmp_path, dt.date(2023, 12, 30), FeatureSettings(), "avazu")
    assert theirs.window == [dt.date(2023, 12, 28), dt.date(2023, 12, 29)]
    assert [p.day for p in theirs.sides["ad"].used] == [dt.date(2023, 12, 28)]
    with pytest.raises(
        FeaturesInputError, match=r"events of 2024-01-04 are dataset 'toy', not 'avazu'"
    ):
        runner.find_inputs(tmp_path, D, FeatureSettings(), "avazu")
    with pytest.raises(FeaturesInputError, match=r"several datasets \(avazu, toy\) and none on"):
        runner.find_inputs(tmp_path, dt.date(2024, 2, 1), FeatureSettings())


# --- a fixed look-back (features.history_days) -----------------------------------------------

LOOKBACK = 2


def expected_windowed_history(
    events: dict[dt.date, pd.DataFrame], read: list[dt.date], days: list[dt.date], n: int
) -> pd.DataFrame:
    """Per event of ``days``: its entities' impressions and clicks per log day of the ``n`` days
    before the row's day (log days: ``read``, the days read before D), and the CTR smoothed over
    the window toward the CTR of all read days before the row's day, with plain pandas."""
    rows = pd.concat([events[d].assign(date=d) for d in days], ignore_index=True)
    past = pd.concat([events[d].assign(date=d) for d in read], ignore_index=True)

    def ctr(days_before: list[dt.date]) -> float:
        seen = past[past["date"].isin(days_before)]
        return float(seen.label.mean())

    result = rows[["event_id", "date"]].copy()
    for role, key in KEYS.items():
        imps, clicks, ctrs = [], [], []
        for ident, day in zip(rows[key], rows["date"], strict=True):
            start = day - dt.timedelta(days=n)
            in_window = (past["date"] >= start) & (past["date"] < day)
            seen = past[(past[key] == ident) & in_window]
            log_days = len([d for d in read if start <= d < day])
            earlier = [d for d in read if d < day]
            prior = ctr(earlier) if earlier else ctr(read)
            imps.append(len(seen) / log_days if log_days else 0.0)
            clicks.append(seen.label.sum() / log_days if log_days else 0.0)
            ctrs.append((seen.label.sum() + STRENGTH * prior) / (len(seen) + STRENGTH))
        result[f"{PREFIX[role]}hist_impressions"] = imps
        result[f"{PREFIX[role]}hist_clicks"] = clicks
        result[f"{PREFIX[role]}hist_ctr"] = ctrs
    return result.sort_values("event_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def windowed(spark, tmp_path_factory):
    """The toy warehouse built with a 2-day look-back: the old day (before the 3-day window) is
    read for history only."""
    settings = toy_settings(tmp_path_factory.mktemp("windowed") / "var", history_days=LOOKBACK)
    events, side = toy_events(), toy_side()
    write_warehouse(layout.warehouse(settings.root), events, side)
    folder = build_features(settings, spark)
    return settings, folder, events, read_outputs(folder)


def test_the_lookback_reads_days_before_the_window_for_history_only(windowed, tmp_path):
    _, folder, events, outputs = windowed
    manifest = verify(folder)

    assert manifest["train_dates"] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert manifest["history_days"] == LOOKBACK and manifest["lookback_dates"] == ["2023-12-31"]
    read = [e["date"] for e in manifest["inputs"]["events"]]
    assert read == ["2023-12-31", "2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    assert set(outputs["training/ranking"]["date"]) == set(TRAIN)  # no rows of the old day
    assert manifest["counts"]["training/ranking"] == 120
    retrieval = outputs["training/retrieval"]
    assert len(retrieval) == int(pd.concat([events[d] for d in TRAIN]).label.sum())
    # Statistics and vocabularies describe the training rows, not the look-back day.
    spec = load_feature_spec(folder)
    ranking = outputs["training/ranking"]
    for name in ("user__hist_impressions", "ad__hist_clicks", "ctx__hist_ctr"):
        feature = spec.feature(name)
        values = ranking[name].to_numpy()
        values = np.log1p(np.maximum(values, 0)) if feature.log1p else values
        assert feature.mean == pytest.approx(values.mean()), name
        assert feature.std == pytest.approx(values.std()), name
    counts = ranking["user__device"].value_counts()
    assert spec.vocabulary("user__device") == sorted(
        (v for v, n in counts.items() if n >= 2), key=lambda v: (-counts[v], v)
    )
    # Without a look-back the old day is not read at all.
    write_warehouse(tmp_path, events, toy_side())
    assert [p.day for p in find_inputs(tmp_path, D, FeatureSettings(train_days=3)).events] == [
        *TRAIN,
        D,
    ]


def test_windowed_history_is_per_log_day_of_the_lookback_in_training_and_eval_rows(windowed):
    _, _, events, outputs = windowed

    expected = expected_windowed_history(events, [OLD, *TRAIN], [*TRAIN, D], LOOKBACK)
    got = pd.concat([outputs["training/ranking"], outputs["eval"]]).sort_values("event_id")
    got = got.reset_index(drop=True)

    assert list(got["event_id"]) == list(expected["event_id"])
    for column in history_columns():
        np.testing.assert_allclose(got[column], expected[column], err_msg=column)
    # The window's first day sees the old day (1 log day in its look-back), not nothing.
    first = got[got["date"] == D1]
    assert (first["user__hist_impressions"] > 0).any()


def test_entity_tables_of_d_hold_what_a_row_dated_d_gets_offline(windowed):
    """Offline/online agreement: every entity seen on D has in D's entity table (or, first seen on
    D, in the spec's defaults) the history features its eval rows carry, and every entity the
    same definition over D-2 and D-1."""
    _, folder, events, outputs = windowed
    spec = load_feature_spec(folder)
    past = pd.concat([events[d].assign(date=d) for d in (D2, D3)])

    for role, key in KEYS.items():
        table = outputs[f"entities/{ROLE_TABLE[role]}"].set_index(key)
        names = [f"{PREFIX[role]}hist_{s}" for s in ("impressions", "clicks", "ctr")]
        on_d = outputs["eval"].groupby(key)[names].first()
        for ident, row in on_d.iterrows():
            known = ident in table.index  # else serving uses the defaults (u9: first seen on D)
            defaults = [spec.feature(name).default for name in names]
            online = table.loc[ident, names].to_numpy(dtype=float) if known else defaults
            np.testing.assert_allclose(online, row.to_numpy(dtype=float), err_msg=f"{ident}")
        for ident, group in past.groupby(key):
            n, c = len(group), int(group.label.sum())
            assert table.loc[ident, names[0]] == pytest.approx(n / 2), ident
            assert table.loc[ident, names[1]] == pytest.approx(c / 2), ident
            assert table.loc[ident, names[2]] == pytest.approx(
                (c + STRENGTH * spec.global_ctr) / (n + STRENGTH)
            )
    ads = outputs["entities/ads"].set_index("ad_id")
    assert ads.loc["a4", ["ad__hist_impressions", "ad__hist_clicks"]].tolist() == [0.0, 0.0]
    read = pd.concat([events[d] for d in (OLD, *TRAIN)])
    assert spec.global_ctr == pytest.approx(read.label.mean())  # the prior sees the old day too
