"""Spark ingest on real local Spark: planted faults are quarantined with their reasons, every row is
accounted for, re-runs are idempotent, failures publish nothing, foreign layouts read."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from layouts import avazu_source, open_bandit_source, taobao_source

from deepclick import layout
from deepclick.settings import Settings
from pipelines.ingest.runner import IngestError, run_ingest
from pipelines.specs import SpecError, load_spec

pytestmark = pytest.mark.spark


def _events(settings: Settings, date: str) -> pd.DataFrame:
    return pd.read_parquet(layout.warehouse(settings.root) / "events" / f"date={date}")


def _manifest(settings: Settings, table: str, date: str) -> dict:
    return json.loads(
        (layout.warehouse(settings.root) / table / f"date={date}" / "_manifest.json").read_text()
    )


@pytest.fixture
def taobao(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "taobao"
    return folder, taobao_source(folder)


def test_planted_faults_are_quarantined_with_reasons(spark, settings, taobao) -> None:
    folder, planted = taobao
    report = run_ingest(settings, load_spec("taobao"), folder, dt.date(2017, 5, 9), spark=spark)

    assert report.rows_in == planted["rows_in"]
    assert report.rows_written == planted["good"]
    assert report.duplicates_dropped == planted["duplicates"]
    assert report.rows_other_dates == planted["other_dates"]
    assert report.quarantine_reasons == planted["reasons"]
    assert report.balanced
    quarantine = pd.read_parquet(layout.warehouse(settings.root) / "quarantine" / "date=2017-05-09")
    assert len(quarantine) == len(planted["reasons"]) + planted["side_quarantined"]
    short = quarantine[quarantine.reason.str.startswith("malformed")]
    assert short.raw.tolist() == ["u1,1494288400,ad1"]  # the raw line survives whole
    ads = quarantine[quarantine.source == "ad_feature.csv"]
    assert ads.reason.tolist() == ["column 'price' is not a double: 'cheap'"]
    assert json.loads(ads.raw.iloc[0])["adgroup_id"] == "ad9"


def test_canonical_events_follow_the_contract(spark, settings, taobao) -> None:
    folder, planted = taobao
    run_ingest(settings, load_spec("taobao"), folder, dt.date(2017, 5, 9), spark=spark)
    events = _events(settings, "2017-05-09")
    assert list(events.columns[:8]) == [
        "event_id",
        "event_time",
        "user_id",
        "placement_id",
        "ad_id",
        "label",
        "ctx__hour",
        "ctx__dow",
    ]
    assert len(events) == planted["good"] and events.label.sum() == planted["clicks"]
    assert events.event_id.is_unique
    # Asia/Shanghai is UTC+8: the first impression (00:00 UTC) is at 8 o'clock local time.
    first = events.sort_values("event_time").iloc[0]
    assert first.ctx__hour == "8" and first.ctx__dow == "1"  # 2017-05-09 was a Tuesday
    manifest = _manifest(settings, "events", "2017-05-09")
    assert manifest["counts"]["rows_written"] == planted["good"]
    assert {f["name"] for f in manifest["features"]} >= {"ctx__hour", "ctx__dow"}
    side = pd.read_parquet(layout.warehouse(settings.root) / "side" / "ads" / "date=2017-05-09")
    assert sorted(side.ad_id) == ["ad0", "ad1", "ad2"]
    assert side.set_index("ad_id").loc["ad0", "ad__price"] == 10.5
    side_manifest = _manifest(settings, "side/ads", "2017-05-09")
    assert side_manifest["counts"] == {"rows_in": 4, "rows_written": 3, "rows_quarantined": 1}


def test_rerun_is_idempotent_and_replaces_the_partition(spark, settings, taobao) -> None:
    folder, _ = taobao
    spec = load_spec("taobao")
    run_ingest(settings, spec, folder, dt.date(2017, 5, 9), spark=spark)
    first = _events(settings, "2017-05-09")
    run_ingest(settings, spec, folder, dt.date(2017, 5, 9), spark=spark)
    second = _events(settings, "2017-05-09")
    pd.testing.assert_frame_equal(first, second)
    partition = layout.warehouse(settings.root) / "events" / "date=2017-05-09"
    assert len(list(partition.glob("*.parquet"))) == 1
    leftovers = [p.name for p in layout.warehouse(settings.root).rglob(".*") if p.is_dir()]
    assert leftovers == []


def test_failed_run_leaves_the_published_partition_untouched(spark, settings, taobao) -> None:
    folder, planted = taobao
    spec = load_spec("taobao")
    run_ingest(settings, spec, folder, dt.date(2017, 5, 9), spark=spark)
    before = _manifest(settings, "events", "2017-05-09")
    (folder / "user_profile.csv").unlink()  # the spec names a users table: the run must fail
    with pytest.raises(SpecError, match=r"no file matches 'user_profile\.csv'"):
        run_ingest(settings, spec, folder, dt.date(2017, 5, 9), spark=spark)
    assert _manifest(settings, "events", "2017-05-09") == before
    assert len(_events(settings, "2017-05-09")) == planted["good"]
    assert [p for p in layout.warehouse(settings.root).rglob(".*") if p.is_dir()] == []


def test_dates_absent_from_the_source_are_an_error_naming_what_exists(
    spark, settings, taobao
) -> None:
    folder, _ = taobao
    with pytest.raises(IngestError, match=r"no rows of 2017-06-01.*2017-05-09 \(\d+ rows\)"):
        run_ingest(settings, load_spec("taobao"), folder, dt.date(2017, 6, 1), spark=spark)


def test_avazu_layout_derives_user_and_placement_keys(spark, settings, tmp_path) -> None:
    planted = avazu_source(tmp_path / "avazu")
    report = run_ingest(
        settings, load_spec("avazu"), tmp_path / "avazu", dt.date(2014, 10, 21), spark=spark
    )
    assert report.rows_written == planted["rows"] and report.rows_quarantined == 0
    events = _events(settings, planted["date"])
    assert events.user_id.nunique() == planted["users"]
    assert events.placement_id.nunique() == planted["placements"]
    assert events.ad_id.nunique() == planted["ads"]
    assert set(events.ctx__hour) == {planted["hour"]}
    assert {"ad__C15", "ctx__site_category", "user__device_model"} <= set(events.columns)


def test_open_bandit_reads_obp_all_csv_as_it_ships(spark, settings, tmp_path) -> None:
    """Issue 11 item 3: obp ships obd/<policy>/<campaign>/all.csv (+ item_context.csv)."""
    folder = tmp_path / "obd" / "random" / "all"
    planted = open_bandit_source(folder)
    report = run_ingest(
        settings, load_spec("open_bandit"), folder, dt.date(2019, 11, 24), spark=spark
    )
    assert report.rows_written == planted["rows"] and report.rows_quarantined == 0
    events = _events(settings, planted["date"])
    assert events.user_id.nunique() == planted["users"]
    assert events.placement_id.nunique() == planted["placements"]
    assert sorted(events.ctx__hour.astype(int)) == [0, 1, 2, 3]
    side = pd.read_parquet(
        layout.warehouse(settings.root) / "side" / "ads" / f"date={planted['date']}"
    )
    assert side.set_index("ad_id").loc["1", "ad__item_feature_0"] == 0.25


def test_source_missing_a_spec_column_is_named(spark, settings, tmp_path) -> None:
    folder = tmp_path / "avazu"
    avazu_source(folder)
    text = (folder / "avazu_sample.csv").read_text().replace("C21", "C22", 1)
    (folder / "avazu_sample.csv").write_text(text)
    with pytest.raises(SpecError, match=r"column 'C21' named in the spec is not in the events"):
        run_ingest(settings, load_spec("avazu"), folder, dt.date(2014, 10, 21), spark=spark)
