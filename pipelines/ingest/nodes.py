"""Pure transforms of the ingest stage: raw string rows → checked rows → canonical events.

Every function takes and returns DataFrames and touches no files, so the unit tests call them on
small hand-built inputs. Raw columns arrive as strings (plus ``_corrupt_record`` and ``_source``);
each row gets a ``_reason`` (empty when valid) naming every rule it breaks, so a quarantined row
says why it was rejected.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.specs import (
    ROLE_KEY,
    TABLE_ROLE,
    ColumnType,
    DatasetSpec,
    EntityRole,
    SideTable,
    canonical_name,
)

CORRUPT = "_corrupt_record"
SOURCE = "_source"
REASON = "_reason"
ROW = "_row"
SPARK_TYPE: dict[ColumnType, str] = {
    "string": "string",
    "int": "int",
    "long": "bigint",
    "double": "double",
    "boolean": "boolean",
}
_KEY_SEPARATOR = "\x1f"
MALFORMED = "malformed line: wrong number of columns"


def parse_event_time(raw: Column, fmt: str, timezone: str) -> Column:
    """UTC timestamp from a raw value; null where it does not parse (never an exception)."""
    if fmt == "unix_seconds":
        return F.timestamp_seconds(raw.try_cast("bigint"))
    if fmt == "unix_millis":
        return F.timestamp_millis(raw.try_cast("bigint"))
    local = raw.try_cast("timestamp") if fmt == "iso" else F.try_to_timestamp(raw, F.lit(fmt))
    # Wall-clock values are in the spec's zone; ISO values with an offset are already absolute.
    if fmt != "iso" and timezone != "UTC":
        return F.to_utc_timestamp(local, timezone)
    return local


def _blank(column: Column) -> Column:
    return column.isNull() | (F.trim(column) == "")


def _type_errors(columns: dict[str, ColumnType]) -> list[Column]:
    return [
        F.when(
            F.col(name).isNotNull() & F.col(name).try_cast(SPARK_TYPE[kind]).isNull(),
            F.concat(F.lit(f"column '{name}' is not a {kind}: '"), F.col(name), F.lit("'")),
        )
        for name, kind in columns.items()
        if kind != "string"
    ]


def _wall_clock_to_utc(local: Column, timezone: str) -> Column:
    return F.to_utc_timestamp(local, timezone) if timezone != "UTC" else local


def event_time_of(spec: DatasetSpec) -> Column:
    """UTC event time as the spec declares it (one column, date + hour, or row order); null
    where the values do not parse. Row order needs the ``_row`` column (:func:`add_row_order`)."""
    t = spec.event_time
    if t.column is not None:
        return parse_event_time(F.col(t.column), t.format, t.timezone)
    if t.date_column is not None and t.hour_column is not None:
        day = F.try_to_timestamp(F.trim(F.col(t.date_column)), F.lit(t.date_format))
        hour = F.trim(F.col(t.hour_column)).try_cast("int")
        seconds = F.unix_seconds(day) + hour * 3600
        local = F.when(hour.between(0, 23), F.timestamp_seconds(seconds))
        return _wall_clock_to_utc(local, t.timezone)
    assert t.start is not None and t.rows_per_day is not None
    start = int(dt.datetime.combine(t.start, dt.time(), dt.UTC).timestamp())
    row = F.col(ROW)
    offset = (row / t.rows_per_day).cast("bigint") * 86400 + (
        (row % t.rows_per_day) * 86400 / t.rows_per_day
    ).cast("bigint")
    return _wall_clock_to_utc(F.timestamp_seconds(F.lit(start) + offset), t.timezone)


def _raw_time(spec: DatasetSpec) -> Column:
    """The raw value(s) the event time was read from, for the quarantine reason."""
    columns = spec.event_time.columns
    return F.concat_ws(" ", *[F.coalesce(F.col(c), F.lit("")) for c in columns])


def add_row_order(raw: DataFrame) -> DataFrame:
    """``_row``: the 0-based position of each line across the files in name order (for logs
    whose only time is their row order). Needs ``_path`` and ``_block`` (the file and the byte
    offset of the split a row was read from); within a split Spark reads lines in order."""
    within = F.monotonically_increasing_id()
    order = Window.orderBy(F.col("_path"), F.col("_block"), F.col("_within"))
    return (
        raw.withColumn("_within", within)
        .withColumn(ROW, F.row_number().over(order) - 1)
        .drop("_within", "_path", "_block")
    )


def _key_missing(entity: EntityRole) -> Column:
    """True when any of the entity's key columns is empty."""
    blanks = [_blank(F.col(c)) for c in entity.key_columns]
    result = blanks[0]
    for blank in blanks[1:]:
        result = result | blank
    return result


def label_value(spec: DatasetSpec) -> Column:
    """The label as 1/0 by the spec's mapping; null for a value the mapping does not cover."""
    declared = spec.label
    raw = F.trim(F.col(declared.column))
    if declared.threshold is not None:
        number = raw.try_cast("double")
        return F.when(number.isNotNull(), (number >= declared.threshold).cast("int"))
    positive = raw.isin(*declared.positive)
    if declared.negative is None:
        negative = ~positive & ~_blank(raw)
    else:
        negative = raw.isin(*declared.negative)
    return F.when(positive, F.lit(1)).when(negative, F.lit(0))


def _label_rule(spec: DatasetSpec) -> str:
    declared = spec.label
    if declared.threshold is not None:
        return "a number"
    if declared.negative is None:
        return f"{' / '.join(declared.positive)} or another non-empty value"
    return f"{' / '.join(declared.negative)} or {' / '.join(declared.positive)}"


def check_events(raw: DataFrame, spec: DatasetSpec, latest: dt.datetime | None = None) -> DataFrame:
    """Add ``event_time`` (parsed, UTC), ``date`` and ``_reason`` (all broken rules, '; '-joined).

    Rules: the line has the right number of columns; every key column of user, context and ad is
    present (unless the role declares a value for missing keys); the label is a value the spec
    maps; the event time parses and is not after ``latest`` (a date in 2099 is a broken clock,
    not a day to wait for); typed columns hold values of their type; no value is longer than
    ``max_field_chars``. A row whose time is unusable gets no ``date``.
    """
    tcol = spec.event_time
    event_time = event_time_of(spec)
    label = F.trim(F.col(spec.label.column))
    problems: list[Column] = []
    for role in ("user", "context", "ad"):
        entity: EntityRole = getattr(spec, role)
        if entity.missing.action != "quarantine":
            continue
        for column in entity.key_columns:
            problems.append(F.when(_blank(F.col(column)), F.lit(f"missing {role} key '{column}'")))
    if spec.event_id:
        problems.append(F.when(_blank(F.col(spec.event_id)), F.lit(f"missing '{spec.event_id}'")))
    problems.append(
        F.when(
            label_value(spec).isNull(),
            F.concat(
                F.lit(f"label '{spec.label.column}' is not {_label_rule(spec)}: '"),
                F.coalesce(label, F.lit("")),
                F.lit("'"),
            ),
        )
    )
    what = (
        f"'{tcol.column}' does not parse as {tcol.format}"
        if tcol.column is not None
        else f"{tcol.describe()} does not parse"
    )
    problems.append(
        F.when(
            event_time.isNull(),
            F.concat(F.lit(f"event time {what}: '"), _raw_time(spec), F.lit("'")),
        )
    )
    too_late = F.lit(False)
    if latest is not None:
        bound = F.lit(latest.astimezone(dt.UTC).replace(tzinfo=None)).cast("timestamp")
        too_late = F.coalesce(event_time > bound, F.lit(False))
        problems.append(
            F.when(
                too_late,
                F.concat(
                    F.lit("event time "),
                    F.date_format(event_time, "yyyy-MM-dd HH:mm:ss"),
                    F.lit(f" is after {latest:%Y-%m-%d %H:%M} UTC (a clock in the future)"),
                ),
            )
        )
    for column in spec.events.columns:
        length = F.length(F.col(column))
        problems.append(
            F.when(
                length > spec.max_field_chars,
                F.concat(
                    F.lit(f"column '{column}' holds "),
                    length.cast("string"),
                    F.lit(f" characters (more than max_field_chars {spec.max_field_chars})"),
                ),
            )
        )
    own_rule = {spec.label.column, *tcol.columns}
    problems += _type_errors({k: v for k, v in spec.events.columns.items() if k not in own_rule})
    usable = F.when(~too_late, event_time)
    return (
        raw.withColumn("event_time", usable)
        .withColumn("date", F.date_format("event_time", "yyyy-MM-dd"))
        .withColumn(REASON, _reasons(problems))
    )


def _reasons(problems: list[Column]) -> Column:
    """Every broken rule, '; '-joined; a malformed line reports only that (the rest follows)."""
    return F.when(F.col(CORRUPT).isNotNull(), F.lit(MALFORMED)).otherwise(
        F.concat_ws("; ", *problems)
    )


def raw_record(columns: list[str]) -> Column:
    """The raw row as a JSON object (or the raw line itself when the line was malformed)."""
    return F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*[F.col(c) for c in columns])))


def drop_exact_duplicates(valid: DataFrame, columns: list[str]) -> DataFrame:
    """Keep one row of each group of rows whose raw values are all equal (re-delivered lines)."""
    return valid.dropDuplicates(columns)


def entity_key(entity: EntityRole) -> Column:
    """The entity's string id: its id column, or a stable hash of its ``key_from`` columns; the
    role's declared value where a key column is empty (``missing``)."""
    if entity.id is not None:
        key = F.trim(F.col(entity.id))
    elif len(entity.key_from) == 1:
        key = F.trim(F.col(entity.key_from[0]))
    else:
        joined = F.concat_ws(
            _KEY_SEPARATOR, *[F.coalesce(F.col(c), F.lit("")) for c in entity.key_from]
        )
        key = F.substring(F.sha2(joined, 256), 1, 16)
    if entity.missing.action == "value":
        return F.when(_key_missing(entity), F.lit(entity.missing.value)).otherwise(key)
    return key


def _feature_value(column: str, kind: str) -> Column:
    if kind == "categorical":
        return F.trim(F.col(column))
    return F.col(column).try_cast("double")


def to_canonical(checked: DataFrame, spec: DatasetSpec) -> DataFrame:
    """Valid checked rows → canonical events (docs/contracts.md §2)."""
    tz = spec.event_time.timezone
    local = F.from_utc_timestamp("event_time", tz) if tz != "UTC" else F.col("event_time")
    if spec.event_id:
        event_id = F.trim(F.col(spec.event_id))
    else:
        # A hash of the raw values; identical lines kept as separate events (duplicates: keep)
        # get their occurrence number appended, so event ids stay unique.
        raw_columns = list(spec.events.columns) + ([ROW] if ROW in checked.columns else [])
        joined = F.concat_ws(
            _KEY_SEPARATOR, *[F.coalesce(F.col(c).cast("string"), F.lit("")) for c in raw_columns]
        )
        digest = F.substring(F.sha2(joined, 256), 1, 32)
        checked = checked.withColumn("_digest", digest).withColumn(
            "_occurrence", F.row_number().over(Window.partitionBy("_digest").orderBy("_digest"))
        )
        event_id = F.when(F.col("_occurrence") == 1, F.col("_digest")).otherwise(
            F.concat_ws("-", F.col("_digest"), F.col("_occurrence").cast("string"))
        )
    columns: list[Column] = [
        event_id.alias("event_id"),
        F.col("event_time"),
        entity_key(spec.user).alias("user_id"),
        entity_key(spec.context).alias("placement_id"),
        entity_key(spec.ad).alias("ad_id"),
        label_value(spec).alias("label"),
        F.hour(local).cast("string").alias("ctx__hour"),
        ((F.dayofweek(local) + 5) % 7).cast("string").alias("ctx__dow"),
    ]
    for role in ("user", "context", "ad"):
        entity: EntityRole = getattr(spec, role)
        for column, feature in entity.features.items():
            columns.append(_feature_value(column, feature.kind).alias(canonical_name(role, column)))
    columns.append(F.col("date"))
    return checked.select(*columns)


def check_side_table(raw: DataFrame, table: SideTable) -> DataFrame:
    """Add ``_reason`` to side-table rows: malformed line, missing key, wrong types, duplicate key
    (all but one row of a key are rejected; the kept row is chosen deterministically)."""
    problems = [
        F.when(_blank(F.col(table.key)), F.lit(f"missing key '{table.key}'")),
        *_type_errors(table.columns),
    ]
    checked = raw.withColumn(REASON, _reasons(problems))
    order = [F.col(c).asc_nulls_last() for c in table.columns]
    rank = F.row_number().over(Window.partitionBy(F.trim(F.col(table.key))).orderBy(*order))
    duplicate = (F.col(REASON) == "") & (rank > 1)
    return checked.withColumn(
        REASON,
        F.when(duplicate, F.lit(f"duplicate key '{table.key}' (another row was kept)")).otherwise(
            F.col(REASON)
        ),
    )


def side_to_canonical(checked: DataFrame, table_name: str, table: SideTable) -> DataFrame:
    """Valid side-table rows → the entity id column plus role-prefixed features."""
    role = TABLE_ROLE[table_name]
    columns = [F.trim(F.col(table.key)).alias(ROLE_KEY[role])]
    for column, feature in table.features.items():
        columns.append(_feature_value(column, feature.kind).alias(canonical_name(role, column)))
    return checked.filter(F.col(REASON) == "").select(*columns)
