"""Pure transforms of the features stage (DataFrame → DataFrame, no I/O).

The runner (``runner.py``) reads the canonical events and side snapshots, calls these nodes and
publishes the result; the unit tests call them on tiny hand-built frames. Point-in-time correctness
lives here: every history feature of a row dated ``d`` is built from days strictly before ``d``
(a window that excludes the current day), so no row ever sees its own day's labels. With a look-back
of ``history_days`` N (``features.history_days``) the window is the N days before ``d`` and the
counts are per observed log day of it (:func:`lookback_days`), one definition for the training
rows (:func:`history_by_day`) and for day D's entity tables (:func:`history_before`,
:func:`entity_table`); N = 0 keeps cumulative counts over every earlier day read.

Most work happens on small entity-and-day tables (one row per user, placement or ad and day): the
history features, the side snapshot as of each day, and — weighted by that day's impressions — the
vocabulary counts and numeric statistics, which therefore equal those of the training rows without
a pass over them. The wide rows are only assembled once, for writing.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from models.feature_spec import MISSING, Feature

ALL_PLACEMENTS = "__all__"


def _categorical(column: Column) -> Column:
    """A categorical value as a string, with null and empty mapped to :data:`MISSING`."""
    as_string = column.cast("string")
    return F.when(as_string.isNull() | (as_string == ""), F.lit(MISSING)).otherwise(as_string)


def _typed(columns: set[str], feature: Feature) -> Column:
    """A feature column with the stage's type; absent from the source → missing."""
    column = F.col(feature.name) if feature.name in columns else F.lit(None)
    if feature.kind == "categorical":
        return _categorical(column).alias(feature.name)
    return column.cast("double").alias(feature.name)


def _date_lookup(mapping: Mapping[dt.date, Any], column: str = "date") -> Column:
    """``mapping[column]`` as a Spark expression (a literal map: the mappings here are per day)."""
    if not mapping:
        return F.lit(None)
    pairs: list[Column] = []
    for day, value in sorted(mapping.items()):
        pairs += [F.lit(day), F.lit(value)]
    return F.element_at(F.create_map(*pairs), F.col(column))


def canonical_events(events: DataFrame, features: Sequence[Feature]) -> DataFrame:
    """Project canonical events onto the columns and types the stage works with.

    Args:
        events: canonical events (docs/contracts.md §2) with their ``date`` partition column.
        features: event-row features; absent columns become missing values.

    Returns:
        ``event_id``, ``event_time``, the three ids (strings), ``label`` (int), ``date`` (date)
        and the features: categorical as strings (missing → ``__missing__``), numeric as doubles.
    """
    return events.select(
        F.col("event_id").cast("string").alias("event_id"),
        F.col("event_time").cast("timestamp").alias("event_time"),
        F.col("user_id").cast("string").alias("user_id"),
        F.col("placement_id").cast("string").alias("placement_id"),
        F.col("ad_id").cast("string").alias("ad_id"),
        F.col("label").cast("int").alias("label"),
        F.col("date").cast("date").alias("date"),
        *[_typed(set(events.columns), f) for f in features],
    )


def canonical_side(side: DataFrame, key: str, features: Sequence[Feature]) -> DataFrame:
    """Project side-table snapshots onto key, snapshot date and typed features, one row per key
    and snapshot.

    Args:
        side: ``side/<table>/date=`` snapshots (id column + prefixed features, ``date`` column).
        key: the id column (``user_id``, ``placement_id`` or ``ad_id``).
        features: the snapshots' features.

    Returns:
        ``key``, ``snapshot_date`` and the features, typed as in :func:`canonical_events`; a key
        listed twice in a snapshot keeps its greatest row (deterministic).
    """
    names = [f.name for f in features]
    typed = side.select(
        F.col(key).cast("string").alias(key),
        F.col("date").cast("date").alias("snapshot_date"),
        *[_typed(set(side.columns), f) for f in features],
    )
    if not names:
        return typed.distinct()
    deduped = typed.groupBy(key, "snapshot_date").agg(F.max(F.struct(*names)).alias("_row"))
    return deduped.select(key, "snapshot_date", *[F.col(f"_row.{n}").alias(n) for n in names])


def snapshot_as_of(days: Sequence[dt.date], snapshots: Sequence[dt.date]) -> dict[dt.date, dt.date]:
    """For each day, the newest snapshot dated on or before it (days with none are left out).

    Args:
        days: the event days that need side features.
        snapshots: the dates of the available snapshots.

    Returns:
        ``{day: snapshot date}``.
    """
    ordered = sorted(snapshots)
    result: dict[dt.date, dt.date] = {}
    for day in days:
        earlier = [s for s in ordered if s <= day]
        if earlier:
            result[day] = earlier[-1]
    return result


def join_side_as_of(
    frame: DataFrame,
    side: DataFrame,
    key: str,
    features: Sequence[Feature],
    as_of: Mapping[dt.date, dt.date],
) -> DataFrame:
    """Attach to each row the side features of its entity as of the row's own day.

    Args:
        frame: rows with ``date`` and ``key`` (events, or one row per entity and day).
        side: the union of :func:`canonical_side` snapshots (``key``, ``snapshot_date``, features).
        key: the entity's id column.
        features: the side features to attach.
        as_of: day → snapshot date to use (see :func:`snapshot_as_of`).

    Returns:
        ``frame`` plus the features; entities absent from their snapshot get missing values
        (``__missing__`` for categorical features, null for numeric ones).
    """
    names = [f.name for f in features]
    keyed = frame.withColumn("_snapshot_date", _date_lookup(as_of).cast("date"))
    right = side.select(key, F.col("snapshot_date").alias("_snapshot_date"), *names)
    joined = keyed.join(right, on=[key, "_snapshot_date"], how="left").drop("_snapshot_date")
    categorical = {f.name: MISSING for f in features if f.kind == "categorical"}
    return joined.fillna(categorical) if categorical else joined


def daily_totals(events: DataFrame) -> DataFrame:
    """Impressions and clicks per day over all entities.

    Args:
        events: rows with ``date`` and ``label``.

    Returns:
        ``date``, ``impressions``, ``clicks`` (longs, one row per day).
    """
    return events.groupBy("date").agg(
        F.count(F.lit(1)).alias("impressions"),
        F.coalesce(F.sum("label"), F.lit(0)).cast("long").alias("clicks"),
    )


def daily_counts(events: DataFrame, key: str) -> DataFrame:
    """Impressions and clicks per entity and day.

    Args:
        events: rows with ``key``, ``date`` and ``label``.
        key: the entity's id column.

    Returns:
        ``key``, ``date``, ``impressions``, ``clicks`` (longs, one row per entity and day).
    """
    return events.groupBy(key, "date").agg(
        F.count(F.lit(1)).alias("impressions"),
        F.coalesce(F.sum("label"), F.lit(0)).cast("long").alias("clicks"),
    )


def lookback_days(
    log_days: Sequence[dt.date], days: Sequence[dt.date], history_days: int
) -> dict[dt.date, int]:
    """For each day, how many log days fall in its look-back window ``[day - N, day - 1]``.

    The divisor of the per-day history rates: at the start of the log a window holds fewer than
    N days with events, and dividing by the days that exist (not by N) keeps an entity's rate the
    same however old the log is. Days missing from the log (no partition) do not count.

    Args:
        log_days: the days with events that were read (the look-back days and the window).
        days: the days that need a divisor (every day of the rows, and D).
        history_days: N, the look-back in days (> 0).

    Returns:
        ``{day: number of log days in [day - N, day - 1]}`` (0 for the first log day).
    """
    present = set(log_days)
    return {
        day: sum(day - dt.timedelta(days=back) in present for back in range(1, history_days + 1))
        for day in days
    }


def history_columns(
    impressions: Column,
    clicks: Column,
    window_days: Column | None,
    prior: Column,
    strength: float,
    prefix: str,
) -> list[Column]:
    """The three history features from an entity's impressions and clicks over its window.

    The one definition shared by the training rows and the entity tables of D. With
    ``window_days`` (log days in the look-back) the counts become rates per observed day (0 when
    the window holds no log day); without it they stay cumulative counts. The CTR is smoothed
    over the window's summed counts either way: a rate's scale does not change it.

    Returns:
        ``<prefix>hist_impressions``, ``<prefix>hist_clicks`` (doubles) and ``<prefix>hist_ctr``.
    """
    imps = F.coalesce(impressions, F.lit(0)).cast("double")
    hits = F.coalesce(clicks, F.lit(0)).cast("double")
    ctr = smoothed_ctr(hits, imps, prior, strength)
    if window_days is not None:
        days = window_days.cast("double")
        per_day = F.when(days > 0, F.lit(1.0) / days).otherwise(F.lit(0.0))
        imps, hits = imps * per_day, hits * per_day
    return [
        imps.alias(f"{prefix}hist_impressions"),
        hits.alias(f"{prefix}hist_clicks"),
        ctr.alias(f"{prefix}hist_ctr"),
    ]


def history_before(daily: DataFrame, key: str, before: dt.date, history_days: int = 0) -> DataFrame:
    """Per entity, the impressions and clicks of the days strictly before ``before``: the last
    ``history_days`` of them (the same window :func:`history_by_day` gives a row dated
    ``before``), or all of them when ``history_days`` is 0.

    Args:
        daily: :func:`daily_counts`.
        key: the entity's id column.
        before: the first day not counted (the target day D).
        history_days: the look-back N in days; 0: every earlier day read.

    Returns:
        ``key``, ``hist_impressions``, ``hist_clicks`` (longs, summed over the window) for
        entities with traffic in it.
    """
    window = F.col("date") < F.lit(before)
    if history_days:
        window &= F.col("date") >= F.lit(before - dt.timedelta(days=history_days))
    return (
        daily.filter(window)
        .groupBy(key)
        .agg(
            F.sum("impressions").cast("long").alias("hist_impressions"),
            F.sum("clicks").cast("long").alias("hist_clicks"),
        )
    )


def smoothed_ctr(clicks: Column, impressions: Column, prior: Column, strength: float) -> Column:
    """``(clicks + strength * prior) / (impressions + strength)``: the CTR shrunk toward ``prior``
    by ``strength`` pseudo-impressions (an entity with no history gets exactly ``prior``)."""
    return (clicks + F.lit(strength) * prior) / (impressions + F.lit(strength))


def prior_ctr_by_day(
    totals: Mapping[dt.date, tuple[int, int]], target: dt.date
) -> tuple[float, dict[dt.date, float]]:
    """The global CTR used as the smoothing prior of each day, from days strictly before it.

    Args:
        totals: day → (impressions, clicks) over all events read (training days and maybe D).
        target: the target day D.

    Returns:
        ``(global_ctr, {day: prior})`` where ``global_ctr`` is the CTR of all days before D and
        a day's prior is the CTR of the days before it. The first day has no earlier day; it uses
        ``global_ctr`` (one constant shared by all of that day's rows).
    """

    def ctr(days: list[dt.date]) -> float | None:
        impressions = sum(totals[d][0] for d in days)
        return sum(totals[d][1] for d in days) / impressions if impressions else None

    days = sorted(totals)
    global_ctr = ctr([d for d in days if d < target]) or 0.0
    priors = {}
    for day in days:
        earlier = ctr([d for d in days if d < day])
        priors[day] = global_ctr if earlier is None else earlier
    return global_ctr, priors


def history_by_day(
    daily: DataFrame,
    key: str,
    prefix: str,
    prior_by_day: Mapping[dt.date, float],
    strength: float,
    history_days: int = 0,
    window_days: Mapping[dt.date, int] | None = None,
) -> DataFrame:
    """Per entity and day, the point-in-time history features of that day's rows.

    A window over the entity's days that ends on the day before the current one, so the features
    of day ``d`` never count day ``d`` itself: with ``history_days`` N > 0 the N calendar days
    before it (``rangeBetween(-N, -1)`` over the day number), counts per observed log day of that
    window (``window_days``, :func:`lookback_days`); with N = 0 every earlier day, cumulative
    counts (``rowsBetween(unboundedPreceding, -1)``).

    Args:
        daily: :func:`daily_counts` of the entity.
        key: the entity's id column.
        prefix: the role prefix (``user__``, ``ctx__``, ``ad__``).
        prior_by_day: day → smoothing prior (:func:`prior_ctr_by_day`).
        strength: pseudo-impressions of the prior (``ctr_prior_strength``).
        history_days: the look-back N in days; 0: unbounded.
        window_days: day → log days in its look-back (required when N > 0).

    Returns:
        ``key``, ``date``, ``impressions`` (the day's own count: the weight of the entity-day in
        statistics, never a feature), ``<prefix>hist_impressions``, ``<prefix>hist_clicks``
        (doubles) and ``<prefix>hist_ctr`` (smoothed toward the day's prior).
    """
    if history_days:
        if window_days is None:
            raise ValueError("history_days > 0 needs window_days (nodes.lookback_days)")
        day_number = F.datediff(F.col("date"), F.lit(dt.date(1970, 1, 1)))
        earlier = Window.partitionBy(key).orderBy(day_number).rangeBetween(-history_days, -1)
        divisor: Column | None = _date_lookup(window_days)
    else:
        earlier = Window.partitionBy(key).orderBy("date").rowsBetween(Window.unboundedPreceding, -1)
        divisor = None
    prior = _date_lookup(prior_by_day).cast("double")
    history = history_columns(
        F.sum("impressions").over(earlier),
        F.sum("clicks").over(earlier),
        divisor,
        prior,
        strength,
        prefix,
    )
    return daily.select(key, "date", "impressions", *history)


def join_by_entity_day(
    rows: DataFrame, per_day: DataFrame, key: str, broadcast: bool = False
) -> DataFrame:
    """Attach per entity-and-day features (history, side snapshot) to each row of that entity
    and day.

    Args:
        rows: rows with ``key`` and ``date``.
        per_day: one row per ``key`` and ``date`` (:func:`history_by_day`, maybe with side
            features from :func:`join_side_as_of`).
        key: the entity's id column.
        broadcast: ship ``per_day`` to every task instead of shuffling ``rows`` (small tables).

    Returns:
        ``rows`` plus the columns of ``per_day``.
    """
    right = F.broadcast(per_day) if broadcast else per_day
    return rows.join(right, on=[key, "date"], how="left")


def latest_values(events: DataFrame, key: str, features: Sequence[str]) -> DataFrame:
    """Per entity, the feature values of its latest event (latest ``event_time``, ties broken by
    the greatest ``event_id``).

    Args:
        events: rows with ``key``, ``event_time``, ``event_id`` and the features.
        key: the entity's id column.
        features: the columns to take.

    Returns:
        ``key`` plus the features, one row per entity seen in ``events``.
    """
    if not features:
        return events.select(key).distinct()
    latest = F.max(F.struct("event_time", "event_id", *features)).alias("_latest")
    return (
        events.groupBy(key)
        .agg(latest)
        .select(key, *[F.col(f"_latest.{name}").alias(name) for name in features])
    )


def entity_table(
    keys: DataFrame,
    profiles: Sequence[DataFrame],
    totals: DataFrame,
    key: str,
    prefix: str,
    prior_ctr: float,
    strength: float,
    window_days: int | None = None,
) -> DataFrame:
    """One entity table as of D: every known entity with its profile and history features.

    The history features are :func:`history_columns` of ``totals``: the same definition as the
    training rows' (:func:`history_by_day`) for a row dated D.

    Args:
        keys: one column ``key``, every entity to list (side snapshot ∪ entities seen in events).
        profiles: frames keyed by ``key`` holding profile features (side snapshot, latest values
            seen in events); entities absent from one get missing values.
        totals: :func:`history_before` D (hist_impressions, hist_clicks per key).
        key: the entity's id column.
        prefix: the role prefix of the history features.
        prior_ctr: the global CTR before D.
        strength: pseudo-impressions of the prior.
        window_days: log days in D's look-back (:func:`lookback_days`), dividing the counts
            into per-day rates; None: cumulative counts (``history_days`` 0).

    Returns:
        ``key``, the profile features (null where a profile lacks the entity),
        ``<prefix>hist_impressions``, ``<prefix>hist_clicks`` and ``<prefix>hist_ctr``; entities
        without history have 0 counts and CTR ``prior_ctr``.
    """
    table = keys.select(key).distinct()
    for profile in profiles:
        table = table.join(profile, on=key, how="left")
    table = table.join(totals.select(key, "hist_impressions", "hist_clicks"), on=key, how="left")
    divisor = None if window_days is None else F.lit(window_days)
    history = history_columns(
        F.col("hist_impressions"),
        F.col("hist_clicks"),
        divisor,
        F.lit(prior_ctr),
        strength,
        prefix,
    )
    profile_columns = [c for c in table.columns if c not in ("hist_impressions", "hist_clicks")]
    return table.select(*profile_columns, *history)


def _weight(weight: str | None) -> Column:
    return F.col(weight).cast("double") if weight else F.lit(1.0)


def value_counts(rows: DataFrame, features: Sequence[str], weight: str | None = None) -> DataFrame:
    """How often each value of categorical features occurs, each row counting ``weight`` times.

    With ``weight="impressions"`` on an entity-and-day table this equals counting the training
    rows, without touching them.

    Args:
        rows: rows holding the features (training rows, or entity-day tables).
        features: categorical (string) columns.
        weight: a column giving how many rows each row stands for (default: 1).

    Returns:
        ``feature``, ``value``, ``count`` (long).
    """
    pairs = F.explode(
        F.array(*[F.struct(F.lit(n).alias("feature"), F.col(n).alias("value")) for n in features])
    ).alias("_pair")
    return (
        rows.select(pairs, _weight(weight).alias("_w"))
        .groupBy(F.col("_pair.feature").alias("feature"), F.col("_pair.value").alias("value"))
        .agg(F.sum("_w").cast("long").alias("count"))
    )


def vocabulary(counts: DataFrame, min_count: int) -> DataFrame:
    """The vocabulary entries: values seen at least ``min_count`` times, ordered by feature, most
    frequent first, ties by value.

    Args:
        counts: :func:`value_counts` (several sources may be unioned, one source per feature).
        min_count: the least number of occurrences for a value to get its own entry.

    Returns:
        ``feature``, ``value``, ``count``; values containing a line break are left out (they
        cannot be written one per line) and fall into the OOV buckets.
    """
    kept = counts.filter(
        (F.col("count") >= min_count)
        & F.col("value").isNotNull()
        & ~F.col("value").rlike("[\\r\\n]")
    )
    return kept.orderBy("feature", F.desc("count"), "value")


def numeric_stats(
    rows: DataFrame, features: Sequence[Feature], weight: str | None = None
) -> DataFrame:
    """Mean, population std, min and max of numeric features, after ``log1p(max(x, 0))`` for
    features flagged ``log1p``; missing values are ignored and each row counts ``weight`` times.

    Args:
        rows: rows holding the features (training rows, or entity-day tables).
        features: numeric features.
        weight: a column giving how many rows each row stands for (default: 1).

    Returns:
        one row per feature: ``feature``, ``count`` (rows with a value), ``mean``, ``std``,
        ``min``, ``max`` (nulls when no row has a value).
    """
    w = _weight(weight)
    aggregates: list[Column] = []
    for i, feature in enumerate(features):
        value = F.col(feature.name).cast("double")
        if feature.log1p:
            value = F.log1p(F.greatest(value, F.lit(0.0)))
        present = F.when(value.isNotNull() & (w > 0), w)
        aggregates += [
            F.sum(present).alias(f"n{i}"),
            F.sum(present * value).alias(f"s{i}"),
            F.sum(present * value * value).alias(f"q{i}"),
            F.min(F.when(present.isNotNull(), value)).alias(f"lo{i}"),
            F.max(F.when(present.isNotNull(), value)).alias(f"hi{i}"),
        ]
    sums = rows.agg(*aggregates)
    per_feature = []
    for i, feature in enumerate(features):
        mean = F.col(f"s{i}") / F.col(f"n{i}")
        variance = F.col(f"q{i}") / F.col(f"n{i}") - mean * mean
        per_feature.append(
            F.struct(
                F.lit(feature.name).alias("feature"),
                F.coalesce(F.col(f"n{i}"), F.lit(0.0)).cast("long").alias("count"),
                mean.alias("mean"),
                F.sqrt(F.greatest(variance, F.lit(0.0))).alias("std"),
                F.col(f"lo{i}").alias("min"),
                F.col(f"hi{i}").alias("max"),
            )
        )
    return sums.select(F.explode(F.array(*per_feature)).alias("s")).select("s.*")


def numeric_default(mean: float, log1p: bool) -> float:
    """The raw value that standardises to 0: ``mean``, or ``expm1(mean)`` after ``log1p``."""
    return math.expm1(mean) if log1p else mean


def fill_missing(df: DataFrame, defaults: Mapping[str, Any]) -> DataFrame:
    """Replace nulls with each column's default.

    Args:
        df: any table of the stage.
        defaults: column → default value (columns not in ``df`` are ignored).

    Returns:
        ``df`` with no nulls in the named columns.
    """
    present = {k: v for k, v in defaults.items() if k in df.columns}
    return df.fillna(present) if present else df


def with_ad_log_q(clicked: DataFrame) -> DataFrame:
    """Attach ``ad_log_q``, the log of each ad's share of the clicks in ``clicked`` (the sampling
    probability the two-tower in-batch softmax corrects for).

    Args:
        clicked: clicked impressions with ``ad_id``.

    Returns:
        ``clicked`` plus ``ad_log_q`` (``exp(ad_log_q)`` over distinct ads sums to 1).
    """
    per_ad = clicked.groupBy("ad_id").agg(F.count(F.lit(1)).alias("_clicks"))
    total = per_ad.agg(F.sum("_clicks").alias("_total"))
    shares = per_ad.crossJoin(F.broadcast(total)).select(
        "ad_id", (F.log(F.col("_clicks")) - F.log(F.col("_total"))).alias("ad_log_q")
    )
    return clicked.join(F.broadcast(shares), on="ad_id", how="left")


def popularity(rows: DataFrame, top_n: int) -> DataFrame:
    """The top ads by clicks, overall (``placement_id`` = ``__all__``) and per placement.

    Args:
        rows: the training rows (``placement_id``, ``ad_id``, ``label``).
        top_n: ads kept per list.

    Returns:
        ``placement_id``, ``ad_id``, ``clicks``, ``impressions``, ``rank`` (1 = most clicked;
        ties by more impressions, then by ``ad_id``).
    """
    counts = [F.sum("label").cast("long").alias("clicks"), F.count(F.lit(1)).alias("impressions")]
    per_placement = rows.groupBy("placement_id", "ad_id").agg(*counts)
    overall = per_placement.groupBy("ad_id").agg(
        F.sum("clicks").cast("long").alias("clicks"),
        F.sum("impressions").cast("long").alias("impressions"),
    )
    lists = per_placement.unionByName(overall.withColumn("placement_id", F.lit(ALL_PLACEMENTS)))
    order = Window.partitionBy("placement_id").orderBy(
        F.desc("clicks"), F.desc("impressions"), F.asc("ad_id")
    )
    ranked = lists.withColumn("rank", F.row_number().over(order))
    return ranked.filter(F.col("rank") <= top_n).select(
        "placement_id", "ad_id", "clicks", "impressions", F.col("rank").cast("int").alias("rank")
    )
