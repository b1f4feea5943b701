"""``deepclick features --date D``: the Spark feature stage (DESIGN.md, "features").

Reads the canonical events of the training window (the last ``train_days`` days with events before
D), of the ``history_days`` before it (history features only) and of D itself, plus the side
snapshots, and publishes ``<warehouse>/features/<YYYYMMDD>/`` as
one unit (docs/contracts.md §3): vocabularies, numeric statistics, point-in-time history features,
entity tables as of D, the ranking and retrieval training sets, the eval set of day D, popularity
lists and ``feature_spec.json``. Day D's labels feed nothing but the ``label`` column of ``eval``.

The logic is in ``nodes.py``; this module chooses the inputs (:func:`find_inputs`, which the
lifecycle's features stage calls once, to fingerprint them and to hand them to
:func:`run_features`), wires the nodes and writes the folder the stage names.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F

from deepclick.errors import DeepclickError
from deepclick.layout import PARTITION_MANIFEST
from deepclick.publish import (
    Staging,
    publishing,
)
from deepclick.settings import FeatureSettings, Settings
from models.feature_spec import (
    FEATURE_TABLES,
    HISTORY_SUFFIXES,
    MISSING,
    REQUEST_TIME_FEATURES,
    ROLE_ENTITY,
    ROLE_KEY,
    ROLE_PREFIX,
    ROLE_TABLE,
    ROLES,
    SPEC_FILE,
    EntitySpec,
    Feature,
    FeatureSpec,
    load_feature_spec,
)
from pipelines.features import nodes

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

INPUT_MANIFEST = PARTITION_MANIFEST
TABLES = FEATURE_TABLES
BROADCAST_MAX_ROWS = 500_000
"""Entity-day tables up to this many rows are broadcast to the rows instead of shuffling them."""
PARALLEL_WRITES = 4
"""Output tables written at once: small jobs are dominated by scheduling latency, not CPU."""


class FeaturesInputError(DeepclickError, ValueError):
    """The warehouse does not hold what the features stage needs for the requested day."""


@dataclass(frozen=True)
class Partition:
    """One published input partition: a day of events or a side-table snapshot."""

    day: dt.date
    path: Path
    manifest: dict[str, Any]

    @property
    def rows(self) -> int | None:
        """The row count the partition's manifest reports, if it reports one."""
        counts = self.manifest.get("counts")
        for source in (counts if isinstance(counts, dict) else {}, self.manifest):
            for name in ("rows_written", "rows", "rows_out"):
                if isinstance(source.get(name), int):
                    return source[name]
        return None

    def describe(self, warehouse: Path) -> dict[str, Any]:
        """The partition as an ``inputs`` entry of the features manifest."""
        entry: dict[str, Any] = {
            "date": self.day.isoformat(),
            "path": self.path.relative_to(warehouse).as_posix(),
            "rows": self.rows,
        }
        for key in ("version", "created_at"):
            if key in self.manifest:
                entry[key] = self.manifest[key]
        return entry


@dataclass(frozen=True)
class SideInputs:
    """The snapshots of one side table a run uses: per day, the newest dated on or before it."""

    table: str
    role: str
    key: str
    features: list[Feature]
    used: list[Partition]
    as_of: dict[dt.date, dt.date]


@dataclass(frozen=True)
class Inputs:
    """Everything a run reads, decided before Spark does any work."""

    target: dt.date
    window: list[dt.date]
    events: list[Partition]
    """Every events partition read: the look-back days, the window and D (if it has events)."""
    dataset: str
    event_features: list[Feature]
    warehouse: Path
    """The warehouse the partitions were found in (their paths are described relative to it)."""
    sides: dict[str, SideInputs] = field(default_factory=dict)

    @property
    def target_has_events(self) -> bool:
        return any(p.day == self.target for p in self.events)

    @property
    def log_days(self) -> list[dt.date]:
        """The days read strictly before D (look-back and window): the log the history sees."""
        return [p.day for p in self.events if p.day < self.target]

    def in_window(self) -> Column:
        """Rows of the training window (not the look-back days before it, nor D)."""
        return (F.col("date") >= F.lit(self.window[0])) & (F.col("date") < F.lit(self.target))


def list_partitions(folder: Path) -> list[Partition]:
    """The ``date=YYYY-MM-DD`` partitions under ``folder`` that carry a ``_manifest.json`` (the
    mark of a complete partition), oldest first."""
    found: list[Partition] = []
    if not folder.is_dir():
        return found
    for child in folder.iterdir():
        if not (child.is_dir() and child.name.startswith("date=")):
            continue
        try:
            day = dt.date.fromisoformat(child.name.removeprefix("date="))
        except ValueError:
            continue
        manifest = child / INPUT_MANIFEST
        if not manifest.is_file():
            log.warning("skipping %s: no %s (incomplete partition)", child, INPUT_MANIFEST)
            continue
        found.append(Partition(day, child, json.loads(manifest.read_text())))
    return sorted(found, key=lambda p: p.day)


def training_window(
    available: list[dt.date], target: dt.date, train_days: int, min_train_days: int
) -> list[dt.date]:
    """The last ``train_days`` days with events strictly before ``target``.

    Raises:
        FeaturesInputError: fewer than ``min_train_days`` such days; the message names D and the
            dates that do exist.
    """
    before = sorted(d for d in available if d < target)
    window = before[-train_days:]
    if len(window) < min_train_days:
        existing = ", ".join(d.isoformat() for d in sorted(available)) or "none"
        raise FeaturesInputError(
            f"features for {target.isoformat()} need events on at least {min_train_days} day(s) "
            f"before it (features.min_train_days), found {len(before)}; dates with events in the "
            f"warehouse: {existing}. Ingest earlier days or choose a later --date."
        )
    return window


def _features_of(manifests: list[dict[str, Any]], source: str) -> list[Feature]:
    """The union of the manifests' ``features`` lists (the newest manifest wins a name), typed for
    the stage: categorical values become strings, numeric values doubles."""
    chosen: dict[str, dict[str, Any]] = {}
    for manifest in reversed(manifests):
        for entry in manifest.get("features", []):
            chosen.setdefault(entry["name"], entry)
    for entry in chosen.values():
        if entry.get("role") not in ROLES or entry.get("kind") not in ("categorical", "numeric"):
            raise FeaturesInputError(
                f"{source} manifest feature {entry.get('name')!r} has role {entry.get('role')!r} "
                f"and kind {entry.get('kind')!r}; roles are {', '.join(ROLES)} and kinds are "
                "categorical, numeric (docs/contracts.md §2)"
            )
    return [
        Feature(
            name=entry["name"],
            role=entry["role"],
            kind=entry["kind"],
            dtype="string" if entry["kind"] == "categorical" else "double",
            source=source,  # type: ignore[arg-type]
            request_time=entry["name"] in REQUEST_TIME_FEATURES,
            log1p=bool(entry.get("log1p", False)) and entry["kind"] == "numeric",
        )
        for entry in chosen.values()
    ]


def partition_dataset(partition: Partition) -> str:
    """The dataset a partition was ingested from (``unknown`` for manifests that predate it)."""
    return str(partition.manifest.get("dataset", "unknown"))


def choose_dataset(partitions: list[Partition], target: dt.date, dataset: str | None) -> str:
    """The dataset a run is for: the one asked for, else the one of D's events, else the only
    dataset in the warehouse.

    Raises:
        FeaturesInputError: several datasets and nothing says which one is meant.
    """
    if dataset is not None:
        return dataset
    held = sorted({partition_dataset(p) for p in partitions})
    on_target = [partition_dataset(p) for p in partitions if p.day == target]
    if on_target:
        return on_target[0]
    if len(held) > 1:
        raise FeaturesInputError(
            f"the warehouse holds events of several datasets ({', '.join(held)}) and none on "
            f"{target.isoformat()}; name the dataset (--dataset)"
        )
    return held[0] if held else "unknown"


def lookback_partitions(
    by_day: dict[dt.date, Partition], window: list[dt.date], history_days: int
) -> list[Partition]:
    """The partitions of the ``history_days`` calendar days before the window's first day: read
    for the history features of the window's first days, never turned into training rows."""
    if not history_days:
        return []
    first = window[0]
    start = first - dt.timedelta(days=history_days)
    return [by_day[d] for d in sorted(by_day) if start <= d < first]


def find_inputs(
    warehouse: Path, target: dt.date, cfg: FeatureSettings, dataset: str | None = None
) -> Inputs:
    """Choose the event partitions and side snapshots for ``target`` and check they fit together.

    The window is the last ``train_days`` days *of this dataset* before D: a state root may
    hold several datasets side by side (days of other datasets are not looked at). With
    ``history_days`` N the N days before the window are read too, so that the history features
    of the window's first day look back as far as those of D.

    Raises:
        FeaturesInputError: too few days with events, D's events from another dataset, or a
            feature present both in the event rows and in a side table.
    """
    everything = list_partitions(warehouse / "events")
    name = choose_dataset(everything, target, dataset)
    on_target = [p for p in everything if p.day == target and partition_dataset(p) != name]
    if on_target:
        raise FeaturesInputError(
            f"events of {target.isoformat()} are dataset {partition_dataset(on_target[0])!r}, "
            f"not {name!r}; one features version is built from one dataset"
        )
    by_day = {p.day: p for p in everything if partition_dataset(p) == name}
    window = training_window(list(by_day), target, cfg.train_days, cfg.min_train_days)
    lookback = lookback_partitions(by_day, window, cfg.history_days)
    events = lookback + [by_day[d] for d in window] + ([by_day[target]] if target in by_day else [])
    event_features = _features_of([p.manifest for p in events], "events")
    event_names = {f.name for f in event_features}
    sides: dict[str, SideInputs] = {}
    for role in ROLES:
        table = ROLE_TABLE[role]
        snapshots = {
            p.day: p
            for p in list_partitions(warehouse / "side" / table)
            if p.day <= target and partition_dataset(p) == name
        }
        if not snapshots:
            continue
        as_of = nodes.snapshot_as_of([p.day for p in events] + [target], list(snapshots))
        used = [snapshots[d] for d in sorted(set(as_of.values()))]
        features = _features_of([p.manifest for p in used], "side")
        clash = sorted(event_names & {f.name for f in features})
        if clash:
            raise FeaturesInputError(
                f"features {', '.join(clash)} appear both in the event rows and in side table "
                f"{table}; the ingest must put each feature in one place"
            )
        sides[role] = SideInputs(table, role, ROLE_KEY[role], features, used, as_of)
    return Inputs(target, window, events, name, event_features, warehouse, sides)


def _history_features(role: str) -> list[Feature]:
    """The three point-in-time history features of a role (counts are log1p-scaled)."""
    return [
        Feature(
            name=f"{ROLE_PREFIX[role]}{suffix}",
            role=role,  # type: ignore[arg-type]
            kind="numeric",
            dtype="double",
            source="history",
            log1p=suffix != "hist_ctr",
        )
        for suffix in HISTORY_SUFFIXES
    ]


def feature_list(inputs: Inputs) -> list[Feature]:
    """Every model input in spec order: per role the id, event features, side features, history."""
    features: list[Feature] = []
    for role in ROLES:
        features.append(
            Feature(ROLE_KEY[role], role, "categorical", "string", "events", is_id=True)  # type: ignore[arg-type]
        )
        features += [f for f in inputs.event_features if f.role == role]
        if role in inputs.sides:
            features += inputs.sides[role].features
        features += _history_features(role)
    return features


def _read(spark: SparkSession, root: Path, partitions: list[Partition]) -> DataFrame:
    """One scan of several ``date=`` partitions; ``date`` comes from the folder names."""
    paths = [str(p.path) for p in partitions]
    return spark.read.option("basePath", str(root)).option("mergeSchema", "true").parquet(*paths)


def _parquet_rows(folder: Path) -> int:
    """Rows of a Parquet folder, from the file footers (no Spark job)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.glob("*.parquet")))


def _validate(expected: dict[str, int]) -> Callable[[Staging], None]:
    """A publish check: the spec loads, every table and vocabulary is there, and the tables whose
    size is known in advance have exactly that many rows."""

    def check(staging: Staging) -> None:
        spec = load_feature_spec(staging.path)
        for table in TABLES:
            if not any((staging.path / table).glob("*.parquet")):
                raise ValueError(f"features output {table} has no Parquet file")
        for feature in spec.categorical:
            if not spec.vocabulary_path(feature.name).is_file():
                raise ValueError(f"vocabulary of {feature.name} is missing")
        counts = staging.manifest["counts"]
        for table, rows in expected.items():
            if counts[table] != rows:
                raise ValueError(f"{table} has {counts[table]} rows, expected {rows}")

    return check


def run_features(
    settings: Settings,
    inputs: Inputs,
    out: Path,
    spark: SparkSession | None = None,
) -> Path:
    """Build the features of ``inputs.target`` from the partitions :func:`find_inputs` chose and
    publish them as ``out`` (``<parent>/<version>``); return ``out``.

    The caller (the lifecycle's features stage) finds the inputs once, fingerprints them and
    names the output folder (``deepclick.layout``); this runner only reads, computes and writes.
    Nothing is published unless every table, vocabulary and the spec were written and checked.
    """
    if spark is None:
        from pipelines.spark import get_spark

        spark = get_spark(settings.spark)
    cfg = settings.features
    warehouse = inputs.warehouse
    date = inputs.target

    # 1. Events of the window and of D; the smoothing prior of each day.
    events = nodes.canonical_events(
        _read(spark, warehouse / "events", inputs.events), inputs.event_features
    )
    totals = {
        r["date"]: (int(r["impressions"]), int(r["clicks"]))
        for r in nodes.daily_totals(events).collect()
    }
    global_ctr, prior_by_day = nodes.prior_ctr_by_day(totals, date)
    window_days = (
        nodes.lookback_days(inputs.log_days, [*totals, date], cfg.history_days)
        if cfg.history_days
        else None
    )

    # 2. Per entity and day: history from strictly earlier days and the side snapshot as of that
    #    day. These small tables carry every statistic the stage needs (weighted by the day's
    #    impressions), so the wide joined rows are only ever written, never cached or re-read.
    started = time.perf_counter()
    daily: dict[str, DataFrame] = {}
    per_day: dict[str, DataFrame] = {}
    snapshots: dict[str, DataFrame] = {}
    for role in ROLES:
        key = ROLE_KEY[role]
        daily[role] = nodes.daily_counts(events, key).persist()
        table = nodes.history_by_day(
            daily[role],
            key,
            ROLE_PREFIX[role],
            prior_by_day,
            cfg.ctr_prior_strength,
            cfg.history_days,
            window_days,
        )
        side = inputs.sides.get(role)
        if side is not None:
            raw = _read(spark, warehouse / "side" / side.table, side.used)
            snapshots[role] = nodes.canonical_side(raw, key, side.features)
            table = nodes.join_side_as_of(table, snapshots[role], key, side.features, side.as_of)
        per_day[role] = table.persist()
    event_rows = sum(n for n, _ in totals.values())
    sizes = {  # an entity-day table never has more rows than the events it comes from
        role: event_rows if event_rows <= BROADCAST_MAX_ROWS else per_day[role].count()
        for role in ROLES
    }
    log.info("features: entity-day tables %s in %.1f s", sizes, time.perf_counter() - started)
    try:
        prepared = _Prepared(
            events, daily, per_day, snapshots, sizes, totals, global_ctr, window_days
        )
        return _build_and_publish(settings, inputs, prepared, published=out)
    finally:
        for frame in [*per_day.values(), *daily.values()]:
            frame.unpersist()


@dataclass(frozen=True)
class _Prepared:
    """The small persisted tables a run is built from, plus the day totals."""

    events: DataFrame
    daily: dict[str, DataFrame]
    per_day: dict[str, DataFrame]
    snapshots: dict[str, DataFrame]
    sizes: dict[str, int]
    totals: dict[dt.date, tuple[int, int]]
    global_ctr: float
    window_days: dict[dt.date, int] | None
    """Day → log days in its look-back (``history_days`` > 0), else None (cumulative)."""

    def joined(self, events: DataFrame, defaults: dict[str, Any]) -> DataFrame:
        """``events`` with every entity-day feature attached and missing values filled.

        Small entity-day tables are broadcast; the rows are shuffled at most once per large one
        (first, while they are still narrow)."""

        rows = events
        for role in sorted(ROLES, key=lambda r: self.sizes[r] <= BROADCAST_MAX_ROWS):
            table = self.per_day[role].drop("impressions")
            small = self.sizes[role] <= BROADCAST_MAX_ROWS
            rows = nodes.join_by_entity_day(rows, table, ROLE_KEY[role], small)
        return nodes.fill_missing(rows, defaults)


def _statistics(
    inputs: Inputs, prepared: _Prepared, features: list[Feature]
) -> dict[str, dict[str, Any]]:
    """Numeric statistics of every numeric feature over the training rows, computed from the
    events (event-row features) and the entity-day tables weighted by impressions (the rest)."""
    before = inputs.in_window()
    parts = []
    from_events = [f for f in features if f.kind == "numeric" and f.source == "events"]
    if from_events:
        parts.append(nodes.numeric_stats(prepared.events.filter(before), from_events))
    for role in ROLES:
        held = [f for f in features if f.kind == "numeric" and f.role == role]
        held = [f for f in held if f.source != "events"]
        if held:
            table = prepared.per_day[role].filter(before)
            parts.append(nodes.numeric_stats(table, held, weight="impressions"))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return {r["feature"]: r.asDict() for r in union.collect()}


def _vocabulary(
    inputs: Inputs, prepared: _Prepared, features: list[Feature], min_count: int
) -> DataFrame:
    """The vocabulary entries of every categorical feature over the training rows (see
    :func:`_statistics` for where each feature is counted)."""
    before = inputs.in_window()
    parts = []
    from_events = [f.name for f in features if f.kind == "categorical" and f.source == "events"]
    from_events = [n for n in from_events if n not in ROLE_KEY.values()]
    if from_events:
        parts.append(nodes.value_counts(prepared.events.filter(before), from_events))
    for role in ROLES:
        held = [
            f.name
            for f in features
            if f.kind == "categorical" and f.role == role and f.source != "events"
        ]
        table = prepared.per_day[role].filter(before)
        parts.append(nodes.value_counts(table, [ROLE_KEY[role], *held], weight="impressions"))
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return nodes.vocabulary(union, min_count)


def _describe(
    features: list[Feature],
    stats: dict[str, dict[str, Any]],
    cfg: FeatureSettings,
    global_ctr: float,
) -> tuple[list[Feature], dict[str, Any]]:
    """Fill in each feature's statistics and its value when missing (the default that
    standardises to 0; history: zero counts and the prior CTR)."""
    described: list[Feature] = []
    defaults: dict[str, Any] = {}
    for feature in features:
        if feature.kind == "categorical":
            described.append(replace(feature, oov_buckets=cfg.oov_buckets, default=MISSING))
            defaults[feature.name] = MISSING
            continue
        s = stats[feature.name]
        seen = bool(s["count"])
        mean = float(s["mean"]) if seen else 0.0
        std = float(s["std"]) if seen and s["std"] else 0.0
        if feature.source == "history":
            default = global_ctr if feature.name.endswith("hist_ctr") else 0.0
        else:
            default = nodes.numeric_default(mean, feature.log1p)
        described.append(
            replace(
                feature,
                mean=mean,
                std=std,  # 0: constant over the training rows (models.feature_spec.standard_scale)
                min=float(s["min"]) if seen else 0.0,
                max=float(s["max"]) if seen else 0.0,
                default=default,
            )
        )
        defaults[feature.name] = default
    return described, defaults


def _entity_tables(
    settings: Settings,
    inputs: Inputs,
    prepared: _Prepared,
    defaults: dict[str, Any],
) -> tuple[dict[str, DataFrame], dict[str, EntitySpec]]:
    """The three entity tables as of D: every entity of the newest side snapshot or seen in the
    window, with its profile (side snapshot, else its latest event-row values) and history."""
    date = inputs.target
    past_events = prepared.events.filter(F.col("date") < F.lit(date))
    tables: dict[str, DataFrame] = {}
    specs: dict[str, EntitySpec] = {}
    for role in ROLES:
        key = ROLE_KEY[role]
        from_events = [
            f.name for f in inputs.event_features if f.role == role and not f.request_time
        ]
        past = prepared.daily[role].filter(F.col("date") < F.lit(date))
        keys = past.select(key)
        profiles = [nodes.latest_values(past_events, key, from_events)] if from_events else []
        side = inputs.sides.get(role)
        from_side = [f.name for f in side.features] if side else []
        if side is not None:
            newest = F.col("snapshot_date") == F.lit(side.as_of[date])
            snapshot = prepared.snapshots[role].filter(newest)
            keys = keys.unionByName(snapshot.select(key))
            profiles.append(snapshot.select(key, *from_side))
        held = [*from_events, *from_side, *(h.name for h in _history_features(role))]
        table = nodes.entity_table(
            keys,
            profiles,
            nodes.history_before(prepared.daily[role], key, date, settings.features.history_days),
            key,
            ROLE_PREFIX[role],
            prepared.global_ctr,
            settings.features.ctr_prior_strength,
            None if prepared.window_days is None else prepared.window_days[date],
        )
        name = ROLE_TABLE[role]
        tables[f"entities/{name}"] = nodes.fill_missing(table.select(key, *held), defaults)
        specs[ROLE_ENTITY[role]] = EntitySpec(
            ROLE_ENTITY[role],
            role,  # type: ignore[arg-type]
            key,
            f"entities/{name}",
            tuple(held),
        )
    return tables, specs


def _output_tables(
    settings: Settings,
    inputs: Inputs,
    prepared: _Prepared,
    features: list[Feature],
    defaults: dict[str, Any],
    rows: dict[str, int],
) -> tuple[dict[str, tuple[DataFrame, int]], dict[str, EntitySpec]]:
    """Every output table (lazy) with the number of files to write it as (from its known row
    count ``rows``, else 1), and the entity specs."""
    cfg = settings.features
    date = inputs.target
    names = [f.name for f in features]
    train = prepared.events.filter(inputs.in_window())
    clicked = train.filter(F.col("label") == 1)
    target = prepared.events.filter(F.col("date") == F.lit(date))
    ranking = prepared.joined(train, defaults).select("event_id", "date", "label", *names)
    retrieval = nodes.with_ad_log_q(
        prepared.joined(clicked, defaults).select("event_id", "date", *names)
    ).select("event_id", "date", *names, "ad_log_q")
    evaluation = prepared.joined(target, defaults).select("event_id", "date", "label", *names)
    frames = {
        "training/ranking": ranking,
        "training/retrieval": retrieval,
        "eval": evaluation,
        "popularity": nodes.popularity(train, cfg.popularity_top_n),
    }
    entity_tables, entity_specs = _entity_tables(settings, inputs, prepared, defaults)
    frames.update(entity_tables)
    tables = {
        name: (frame, math.ceil(rows.get(name, 1) / cfg.rows_per_file))
        for name, frame in frames.items()
    }
    return tables, entity_specs


def _build_and_publish(
    settings: Settings, inputs: Inputs, prepared: _Prepared, *, published: Path
) -> Path:
    """Compute statistics, write every output into a staging folder and publish it as
    ``published``."""
    cfg = settings.features
    warehouse = inputs.warehouse
    date = inputs.target
    totals, global_ctr = prepared.totals, prepared.global_ctr
    train_rows = sum(totals[d][0] for d in inputs.window)
    train_clicks = sum(totals[d][1] for d in inputs.window)
    eval_rows, eval_clicks = totals.get(date, (0, 0))
    parent, version = published.parent, published.name
    expected = {
        "training/ranking": train_rows,
        "training/retrieval": train_clicks,
        "eval": eval_rows,
    }
    # Everything from here on happens inside the staging folder: a failure publishes nothing.
    with publishing(parent, version, validate=_validate(expected)) as staging:
        # 3. Statistics and defaults, then the output tables (lazy until written).
        features = feature_list(inputs)
        started = time.perf_counter()
        stats = _statistics(inputs, prepared, features)
        log.info("features: numeric statistics in %.1f s", time.perf_counter() - started)
        described, defaults = _describe(features, stats, cfg, global_ctr)
        tables, entity_specs = _output_tables(
            settings, inputs, prepared, features, defaults, expected
        )

        # 4. Write everything (concurrently: small jobs wait on scheduling, not on CPU).
        out = staging.path
        categorical = [f.name for f in features if f.kind == "categorical"]
        vocabulary = _vocabulary(inputs, prepared, features, cfg.min_count)
        with ThreadPoolExecutor(max_workers=PARALLEL_WRITES) as pool:
            sizes = pool.submit(_write_vocabularies, vocabulary, out / "vocab", categorical)
            writes = [
                pool.submit(_write_table, df, out / name, files)
                for name, (df, files) in tables.items()
            ]
            for future in [sizes, *writes]:
                future.result()
        vocab_sizes = sizes.result()

        # 5. Describe it; leaving the block validates and publishes it.
        spec = FeatureSpec(
            version=version,
            dataset=inputs.dataset,
            target_date=date.isoformat(),
            train_dates=tuple(d.isoformat() for d in inputs.window),
            global_ctr=global_ctr,
            ctr_prior_strength=cfg.ctr_prior_strength,
            features=tuple(
                replace(
                    f, vocabulary_file=f"vocab/{f.name}.txt", vocabulary_size=vocab_sizes[f.name]
                )
                if f.kind == "categorical"
                else f
                for f in described
            ),
            entities=entity_specs,
        )
        spec.write(out)
        counts = {table: _parquet_rows(out / table) for table in TABLES}
        counts.update({f"vocab/{name}.txt": size for name, size in vocab_sizes.items()})
        staging.manifest.update(
            {
                "stage": "features",
                "dataset": inputs.dataset,
                "target_date": date.isoformat(),
                "train_dates": list(spec.train_dates),
                "history_days": cfg.history_days,
                "lookback_dates": [d.isoformat() for d in inputs.log_days if d < inputs.window[0]],
                "target_day_has_events": inputs.target_has_events,
                "feature_spec": SPEC_FILE,
                "inputs": {
                    "events": [p.describe(warehouse) for p in inputs.events],
                    "side": {
                        side.table: [p.describe(warehouse) for p in side.used]
                        for side in inputs.sides.values()
                    },
                },
                "counts": counts,
                "metrics": {
                    "global_ctr": global_ctr,
                    "train_impressions": train_rows,
                    "train_clicks": train_clicks,
                    "eval_impressions": eval_rows,
                    "eval_clicks": eval_clicks,
                },
            }
        )
    log.info("published features %s (%d training rows)", parent / version, train_rows)
    return parent / version


def _write_table(df: DataFrame, path: Path, files: int) -> None:
    """Write one table as at most ``files`` Parquet files (at least one, even when empty)."""
    started = time.perf_counter()
    df.coalesce(max(1, files)).write.parquet(str(path))
    log.info("features: wrote %s in %.1f s", path.name, time.perf_counter() - started)


def _write_vocabularies(entries: DataFrame, folder: Path, features: list[str]) -> dict[str, int]:
    """Write ``<folder>/<feature>.txt`` (most frequent first, ties by value); return the sizes."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    sizes = dict.fromkeys(features, 0)
    handles = {name: (folder / f"{name}.txt").open("w", encoding="utf-8") for name in features}
    try:
        for row in entries.toLocalIterator():
            handles[row["feature"]].write(row["value"] + "\n")
            sizes[row["feature"]] += 1
    finally:
        for handle in handles.values():
            handle.close()
    log.info("features: wrote vocabularies in %.1f s", time.perf_counter() - started)
    return sizes
