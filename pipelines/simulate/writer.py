"""The simulator's only I/O: day folders of raw logs, ground-truth files, and the world file.

Layout (docs/contracts.md, section 1)::

    <out_dir>/<YYYY-MM-DD>/{raw_sample,ad_feature,user_profile,placement_feature}.csv
    <out_dir>/_truth/<YYYY-MM-DD>.parquet     impression_id, p_click
    <out_dir>/_truth/world.npz                the latent model (see world.World)

Day folders are published with ``deepclick.publish`` (staging folder, atomic rename), so a reader
sees a whole day or none; each day's truth file is in place before its folder appears. Every file
is a function of the settings only (no timestamps inside), so reruns are byte-identical; only the
``created_at`` of each day's ``manifest.json`` changes.
"""

from __future__ import annotations

import datetime as dt
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from deepclick.layout import version_for
from deepclick.publish import publishing
from pipelines.simulate.impressions import Impressions
from pipelines.simulate.world import (
    AD_PREFIX,
    BRAND_PREFIX,
    CAMPAIGN_PREFIX,
    CATEGORY_PREFIX,
    CUSTOMER_PREFIX,
    IMPRESSION_PREFIX,
    PAGE_TYPES,
    PLACEMENT_PREFIX,
    SLOT_SIZES,
    USER_PREFIX,
    World,
)

RAW_SAMPLE = "raw_sample.csv"
AD_FEATURE = "ad_feature.csv"
USER_PROFILE = "user_profile.csv"
PLACEMENT_FEATURE = "placement_feature.csv"
TRUTH_DIR = "_truth"
WORLD_FILE = "world.npz"

# Plain CSV like the taobao files: no quotes (ids and categories never contain commas).
CSV_OPTIONS = pacsv.WriteOptions(quoting_style="none", quoting_header="none", batch_size=1 << 16)

RAW_SAMPLE_SCHEMA = pa.schema(
    [
        ("impression_id", pa.string()),
        ("user", pa.string()),
        ("time_stamp", pa.int64()),
        ("adgroup_id", pa.string()),
        ("pid", pa.string()),
        ("nonclk", pa.int8()),
        ("clk", pa.int8()),
    ]
)
TRUTH_SCHEMA = pa.schema([("impression_id", pa.string()), ("p_click", pa.float64())])


# Arrays are built from raw buffers: ``pa.array`` imports pandas (~1 s), which would dominate
# small runs, and the buffer route is zero-copy for numbers.
_ARROW_TYPES = {
    np.dtype(np.int8): pa.int8(),
    np.dtype(np.int16): pa.int16(),
    np.dtype(np.int32): pa.int32(),
    np.dtype(np.int64): pa.int64(),
    np.dtype(np.float64): pa.float64(),
}


def column(values: np.ndarray, dtype: np.dtype | type = np.int64) -> pa.Array:
    """A numeric numpy column as an Arrow array of the same type (``dtype`` casts first)."""
    array = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(_ARROW_TYPES[array.dtype], len(array), [None, pa.py_buffer(array)])


def strings(values: tuple[str, ...]) -> pa.Array:
    """A small Arrow string array from Python strings."""
    encoded = [v.encode() for v in values]
    offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int32)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


def ids(prefix: str, index: np.ndarray) -> pa.Array:
    """String ids ``<prefix><index>`` built in Arrow (fast for millions of rows)."""
    return pc.utf8_replace_slice(column(index).cast(pa.string()), 0, 0, prefix)


def _labels(names: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    return strings(names).take(column(codes))


def raw_sample_table(batch: Impressions) -> pa.Table:
    """The logged impressions as raw_sample.csv rows."""
    return pa.Table.from_arrays(
        [
            ids(IMPRESSION_PREFIX, batch.impression_no),
            ids(USER_PREFIX, batch.user),
            column(batch.time_stamp),
            ids(AD_PREFIX, batch.ad),
            ids(PLACEMENT_PREFIX, batch.placement),
            column(1 - batch.clk, np.int8),
            column(batch.clk, np.int8),
        ],
        schema=RAW_SAMPLE_SCHEMA,
    )


def truth_table(batch: Impressions) -> pa.Table:
    """The true click probability of each logged impression."""
    return pa.Table.from_arrays(
        [ids(IMPRESSION_PREFIX, batch.impression_no), column(batch.p_click, np.float64)],
        schema=TRUTH_SCHEMA,
    )


def ad_feature_table(world: World, ads: np.ndarray) -> pa.Table:
    """ad_feature.csv rows for the ads ``ads`` (the day's live catalogue)."""
    return pa.table(
        {
            "adgroup_id": ids(AD_PREFIX, ads),
            "cate_id": ids(CATEGORY_PREFIX, world.ad_cate[ads]),
            "campaign_id": ids(CAMPAIGN_PREFIX, world.ad_campaign[ads]),
            "customer": ids(CUSTOMER_PREFIX, world.ad_customer[ads]),
            "brand": ids(BRAND_PREFIX, world.ad_brand[ads]),
            "price": column(world.ad_price[ads], np.float64),
            "bid": column(world.ad_bid[ads], np.float64),
        }
    )


def user_profile_table(world: World) -> pa.Table:
    """user_profile.csv rows: every user (the user base does not change between days)."""
    return pa.table(
        {
            "userid": ids(USER_PREFIX, np.arange(world.num_users)),
            "cms_segid": column(world.user_segid, np.int16),
            "cms_group_id": column(world.user_group, np.int16),
            "final_gender_code": column(world.user_gender, np.int8),
            "age_level": column(world.user_age, np.int8),
            "pvalue_level": column(world.user_pvalue, np.int8),
            "shopping_level": column(world.user_shopping, np.int8),
            "occupation": column(world.user_occupation, np.int8),
            "new_user_class_level": column(world.user_new_class, np.int8),
        }
    )


def placement_feature_table(world: World, placements: np.ndarray) -> pa.Table:
    """placement_feature.csv rows for the placements ``placements`` (the day's live ones)."""
    return pa.table(
        {
            "pid": ids(PLACEMENT_PREFIX, placements),
            "page_type": _labels(PAGE_TYPES, world.placement_page[placements]),
            "slot_size": _labels(SLOT_SIZES, world.placement_slot[placements]),
            "position": column(world.placement_position[placements], np.int8),
        }
    )


def csv_bytes(table: pa.Table) -> bytes:
    """A table rendered once as CSV, for files written identically every day."""
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, CSV_OPTIONS)
    return sink.getvalue().to_pybytes()


def save_world(world: World, path: Path) -> None:
    """Write ``world.npz`` reproducibly (fixed zip timestamps) and atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in world.to_arrays().items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)
    os.replace(partial, path)


def load_world(path: Path | str) -> World:
    """Read a ``world.npz`` written by :func:`save_world` (a folder means its ``_truth/world.npz``
    or ``world.npz`` inside it)."""
    path = Path(path)
    if path.is_dir():
        nested = path / TRUTH_DIR / WORLD_FILE
        path = nested if nested.is_file() else path / WORLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no simulated world at {path}: run `deepclick simulate` first")
    with np.load(path, allow_pickle=False) as data:
        return World.from_arrays({name: data[name] for name in data.files})


@dataclass
class DayLog:
    """An open day being written: feed it hourly batches with :meth:`write`."""

    raw: pacsv.CSVWriter
    truth: pq.ParquetWriter
    manifest: dict[str, Any] = field(default_factory=dict)

    def write(self, batch: Impressions) -> None:
        self.raw.write_table(raw_sample_table(batch))
        self.truth.write_table(truth_table(batch))


@contextmanager
def open_day(
    out_dir: Path,
    date: dt.date,
    world: World,
    ads: np.ndarray,
    placements: np.ndarray,
    user_profile_csv: bytes,
) -> Iterator[DayLog]:
    """Write one day: side-table snapshots now, impressions as they come, publish on exit.

    Whatever the caller puts in ``DayLog.manifest`` (counts, metrics, inputs) goes into the day's
    manifest. On an error nothing of the day becomes visible.
    """
    day_name = date.isoformat()
    truth_dir = out_dir / TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth_partial = truth_dir / f".{day_name}.parquet.partial"
    try:
        with publishing(
            out_dir, version_for(date), target_name=day_name, update_current=False
        ) as staging:
            folder = staging.path
            pacsv.write_csv(ad_feature_table(world, ads), folder / AD_FEATURE, CSV_OPTIONS)
            pacsv.write_csv(
                placement_feature_table(world, placements), folder / PLACEMENT_FEATURE, CSV_OPTIONS
            )
            (folder / USER_PROFILE).write_bytes(user_profile_csv)
            with (
                pacsv.CSVWriter(
                    folder / RAW_SAMPLE, RAW_SAMPLE_SCHEMA, write_options=CSV_OPTIONS
                ) as raw,
                pq.ParquetWriter(truth_partial, TRUTH_SCHEMA) as truth,
            ):
                log = DayLog(raw, truth)
                yield log
            staging.manifest.update(log.manifest)
            os.replace(truth_partial, truth_dir / f"{day_name}.parquet")
    finally:
        truth_partial.unlink(missing_ok=True)
