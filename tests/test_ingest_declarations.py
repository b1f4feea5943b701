"""Issue 11: what real logs need, declared in the spec instead of a conversion script — label
encodings, empty keys, duplicate policy, event time from date + hour or row order, a ceiling on
the quarantined share — and the refusals that name the file or the rule (binary and empty files,
huge fields, clocks in the future, a day that holds another dataset, per-day folders)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from layouts import write_csv

from deepclick import layout
from deepclick.settings import Settings
from pipelines.ingest.runner import IngestError, run_ingest
from pipelines.specs import UNKNOWN_KEY, DatasetSpec, SpecError, load_spec, parse_spec

pytestmark = pytest.mark.spark

HEADER = ["uid", "slot", "ad", "day", "hour", "ts", "y"]
DAY = dt.date(2021, 3, 1)
T0 = 1614556800  # 2021-03-01 00:00:00 UTC


def mini_spec(**changes: Any) -> DatasetSpec:
    """A small layout: user uid, placement slot, ad; time and label as each test declares."""
    raw: dict[str, Any] = {
        "name": "mini",
        "events": {
            "file": "*.csv",
            "columns": {c: ("long" if c == "ts" else "string") for c in HEADER},
        },
        "event_time": {"column": "ts", "format": "unix_seconds"},
        "label": {"column": "y"},
        "user": {"id": "uid"},
        "context": {"id": "slot"},
        "ad": {"id": "ad"},
    }
    raw.update(changes)
    return parse_spec(raw)


def row(uid: str, y: str, ts: int = T0 + 60, *, day: str = "", hour: str = "") -> list[str]:
    return [uid, "s1", "a1", day, hour, str(ts), y]


def events(settings: Settings, date: str = "2021-03-01") -> pd.DataFrame:
    return pd.read_parquet(layout.warehouse(settings.root) / "events" / f"date={date}")


def test_minus_one_labels_are_read_by_the_declared_values(spark, settings, tmp_path) -> None:
    write_csv(tmp_path / "log.csv", HEADER, [row("u1", "1"), row("u2", "-1"), row("u3", "-1")])
    spec = mini_spec(label={"column": "y", "positive": ["1"], "negative": ["-1"]})
    report = run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert (report.rows_written, report.rows_quarantined) == (3, 0)
    assert events(settings).set_index("user_id").label.to_dict() == {"u1": 1, "u2": 0, "u3": 0}


def test_label_threshold_counts_values_at_or_above_it(spark, settings, tmp_path) -> None:
    write_csv(tmp_path / "log.csv", HEADER, [row("u1", "0.7"), row("u2", "0.2"), row("u3", "x")])
    spec = mini_spec(label={"column": "y", "threshold": 0.5})
    report = run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert report.quarantine_reasons == {"label 'y' is not a number: 'x'": 1}
    assert events(settings).set_index("user_id").label.to_dict() == {"u1": 1, "u2": 0}


def test_undeclared_label_encoding_fails_the_ingest_and_publishes_nothing(
    spark, settings, tmp_path
) -> None:
    """Before: a -1/1 label quarantined every negative and the ingest exited 0, positives only."""
    rows = [row(f"u{i}", "1" if i == 0 else "-1") for i in range(10)]
    write_csv(tmp_path / "log.csv", HEADER, rows)
    with pytest.raises(IngestError, match=r"9 of 10 rows .*\(90\.0%\).*max_quarantined_share 50%"):
        run_ingest(settings, mini_spec(), tmp_path, DAY, spark=spark)
    assert not (layout.warehouse(settings.root) / "events").exists()
    assert not (layout.warehouse(settings.root) / "quarantine").exists()


def test_identical_lines_without_event_id_are_distinct_events(spark, settings, tmp_path) -> None:
    """Before: exact duplicates were dropped even without an event id (27.6% of one log)."""
    same = row("u1", "0")
    write_csv(tmp_path / "log.csv", HEADER, [same, same, same, row("u2", "1")])
    report = run_ingest(settings, mini_spec(), tmp_path, DAY, spark=spark)
    assert (report.rows_written, report.duplicates_dropped) == (4, 0)
    written = events(settings)
    assert written.event_id.is_unique and (written.user_id == "u1").sum() == 3

    run_ingest(settings, mini_spec(duplicates="drop_exact"), tmp_path, DAY, spark=spark)
    assert len(events(settings)) == 2


def test_empty_keys_follow_the_declared_policy(spark, settings, tmp_path) -> None:
    write_csv(tmp_path / "log.csv", HEADER, [row("u1", "0"), row("", "1"), row(" ", "0")])
    spec = mini_spec(max_quarantined_share=1.0)
    report = run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert report.quarantine_reasons == {"missing user key 'uid'": 2}

    spec = mini_spec(user={"id": "uid", "missing": "unknown"})
    run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert sorted(events(settings).user_id) == [UNKNOWN_KEY, UNKNOWN_KEY, "u1"]

    spec = mini_spec(user={"id": "uid", "missing": {"value": "anonymous"}})
    run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert sorted(events(settings).user_id) == ["anonymous", "anonymous", "u1"]


def test_event_time_from_date_and_hour_columns(spark, settings, tmp_path) -> None:
    rows = [
        row("u1", "0", day="2021-03-01", hour="0"),
        row("u2", "0", day="2021-03-01", hour="23"),
        row("u3", "0", day="2021-03-01", hour="24"),
        row("u4", "0", day="2021-03-02", hour="5"),
    ]
    write_csv(tmp_path / "log.csv", HEADER, rows)
    spec = mini_spec(event_time={"date_column": "day", "hour_column": "hour"})
    report = run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert report.rows_other_dates == {"2021-03-02": 1}
    assert report.quarantine_reasons == {
        "event time 'day' (yyyy-MM-dd) + hour 'hour' does not parse: '2021-03-01 24'": 1
    }
    written = events(settings).set_index("user_id")
    assert written.ctx__hour.to_dict() == {"u1": "0", "u2": "23"}


def test_event_time_from_row_order_across_files(spark, settings, tmp_path) -> None:
    """Three rows a day from 2021-03-01; files are read in name order, rows in file order."""
    write_csv(tmp_path / "part-1.csv", HEADER, [row(f"u{i}", "0") for i in range(4)])
    write_csv(tmp_path / "part-2.csv", HEADER, [row(f"u{i}", "0") for i in range(4, 7)])
    spec = mini_spec(event_time={"start": "2021-03-01", "rows_per_day": 3})
    report = run_ingest(settings, spec, tmp_path, DAY, dt.date(2021, 3, 3), spark=spark)
    assert {d: c.rows_written for d, c in report.per_date.items()} == {
        "2021-03-01": 3,
        "2021-03-02": 3,
        "2021-03-03": 1,
    }
    first = events(settings).sort_values("event_time")
    assert first.user_id.tolist() == ["u0", "u1", "u2"]
    assert first.ctx__hour.tolist() == ["0", "8", "16"]  # spread evenly over the day
    assert sorted(events(settings, "2021-03-02").user_id) == ["u3", "u4", "u5"]
    assert events(settings, "2021-03-03").user_id.tolist() == ["u6"]


def test_a_date_range_reads_per_day_folders(spark, settings, tmp_path) -> None:
    """Issue 11 item 9: the layout `deepclick simulate` writes, <source>/<YYYY-MM-DD>/."""
    for offset in range(2):
        ts = T0 + 86400 * offset + 60
        write_csv(
            tmp_path / "raw" / f"2021-03-0{offset + 1}" / "log.csv", HEADER, [row("u", "0", ts)]
        )
    report = run_ingest(
        settings, mini_spec(), tmp_path / "raw", DAY, dt.date(2021, 3, 3), spark=spark
    )
    assert report.rows_written == 2 and report.missing_dates == ["2021-03-03"]
    assert len(events(settings, "2021-03-02")) == 1


def test_binary_and_empty_files_are_refused_by_name(spark, settings, tmp_path) -> None:
    (tmp_path / "log.csv").write_bytes(gzip.compress(b"uid,slot\n" * 50))
    with pytest.raises(SpecError, match=r"log\.csv is (binary|not UTF-8)"):
        run_ingest(settings, mini_spec(), tmp_path, DAY, spark=spark)
    (tmp_path / "log.csv").write_text("")
    with pytest.raises(SpecError, match=r"events source .*log\.csv is empty"):
        run_ingest(settings, mini_spec(), tmp_path, DAY, spark=spark)


def test_huge_fields_and_future_clocks_are_quarantined(spark, settings, tmp_path) -> None:
    huge = row("u2", "0")
    huge[1] = "x" * 5000
    future = int(dt.datetime(2099, 1, 1, tzinfo=dt.UTC).timestamp())
    write_csv(tmp_path / "log.csv", HEADER, [row("u1", "0"), huge, row("u3", "0", future)])
    spec = mini_spec(max_quarantined_share=1.0)
    report = run_ingest(settings, spec, tmp_path, DAY, spark=spark)
    assert report.rows_written == 1 and report.rows_other_dates == {}
    reasons = list(report.quarantine_reasons)
    assert "column 'slot' holds 5000 characters (more than max_field_chars 4096)" in reasons
    assert any(r.startswith("event time 2099-01-01 00:00:00 is after") for r in reasons)


def test_a_day_holding_another_dataset_is_not_replaced(spark, settings, tmp_path) -> None:
    """Issue 11 item 8: datasets sit side by side in one state root, never overwrite each other."""
    write_csv(tmp_path / "log.csv", HEADER, [row("u1", "0")])
    run_ingest(settings, mini_spec(), tmp_path, DAY, spark=spark)
    other = mini_spec(name="other")
    with pytest.raises(IngestError, match=r"events of 2021-03-01 .* already dataset 'mini'"):
        run_ingest(settings, other, tmp_path, DAY, spark=spark)
    manifest = layout.warehouse(settings.root) / "events" / "date=2021-03-01" / "_manifest.json"
    assert json.loads(manifest.read_text())["dataset"] == "mini"


def test_talkingdata_layout_reads_with_the_builtin_spec(spark, settings, tmp_path) -> None:
    """The TalkingData AdTracking layout as shipped: both click_time spellings, repeated clicks
    kept, attributed_time ignored."""
    header = [
        "ip",
        "app",
        "device",
        "os",
        "channel",
        "click_time",
        "attributed_time",
        "is_attributed",
    ]
    rows = [
        ["87540", "12", "1", "13", "497", "2017-11-07 9:30", "", "0"],
        ["87540", "12", "1", "13", "497", "2017-11-07 9:30", "", "0"],
        ["105560", "25", "1", "17", "259", "2017-11-07 13:40:27", "2017-11-07 13:45:01", "1"],
        ["5314", "9", "2", "19", "134", "2017-11-06 23:59", "", "0"],
    ]
    write_csv(tmp_path / "train_sample.csv", header, rows)
    report = run_ingest(
        settings, load_spec("talkingdata"), tmp_path, dt.date(2017, 11, 7), spark=spark
    )
    assert (report.rows_written, report.rows_other_dates) == (3, {"2017-11-06": 1})
    written = events(settings, "2017-11-07").sort_values("event_time")
    assert written.ctx__hour.tolist() == ["9", "9", "13"] and written.label.tolist() == [0, 0, 1]
    assert written.ad_id.tolist() == ["12", "12", "25"] and written.event_id.is_unique
    assert written.user_id.nunique() == 2
    assert "attributed_time" not in " ".join(written.columns)


def test_the_readmes_bring_your_own_log_example_ingests_as_written(spark, settings, tmp_path):
    """The README's "Bring your own log" spec and sample lines, taken from the README itself."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Bring your own log", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")
    sample = next(b for b in blocks[1::2] if b.startswith("\nday\t"))
    spec_text = next(b for b in blocks[1::2] if b.startswith("yaml\n"))
    (tmp_path / "rtb.yaml").write_text(spec_text.removeprefix("yaml\n"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "impressions-1.tsv").write_text(sample.lstrip("\n"))
    spec = load_spec(tmp_path / "rtb.yaml")
    report = run_ingest(settings, spec, tmp_path / "logs", dt.date(2024, 3, 1), spark=spark)
    assert (report.rows_written, report.rows_quarantined) == (2, 0)
    written = events(settings, "2024-03-01").sort_values("ad_id")
    assert written.user_id.tolist() == [UNKNOWN_KEY, "c81f"]  # cr12 had no cookie
    assert written.label.tolist() == [1, 0] and set(written.ctx__hour) == {"0"}
