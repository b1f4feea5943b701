"""Pure transforms of the ingest stage: raw string rows → checked rows → canonical events.

Every function takes and returns DataFrames and touches no files, so the unit tests call them on
small hand-built inputs. Raw columns arrive as strings (plus ``_corrupt_record`` and ``_source``);
each row gets a ``_reason`` (empty when valid) naming every rule it breaks, so a quarantined row
says why it was rejected.
"""

from __future__ import annotations

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


def check_events(raw: DataFrame, spec: DatasetSpec) -> DataFrame:
    """Add ``event_time`` (parsed, UTC), ``date`` and ``_reason`` (all broken rules, '; '-joined).

    Rules: the line has the right number of columns; every key column of user, context and ad is
    present; the label is 0 or 1; the event time parses; typed columns hold values of their type.
    """
    tcol = spec.event_time
    event_time = parse_event_time(F.col(tcol.column), tcol.format, tcol.timezone)
    label = F.trim(F.col(spec.label.column))
    problems: list[Column] = []
    for role in ("user", "context", "ad"):
        entity: EntityRole = getattr(spec, role)
        for column in entity.key_columns:
            problems.append(F.when(_blank(F.col(column)), F.lit(f"missing {role} key '{column}'")))
    if spec.event_id:
        problems.append(F.when(_blank(F.col(spec.event_id)), F.lit(f"missing '{spec.event_id}'")))
    problems.append(
        F.when(
            label.isNull() | ~label.isin("0", "1"),
            F.concat(
                F.lit(f"label '{spec.label.column}' is not 0 or 1: '"),
                F.coalesce(label, F.lit("")),
                F.lit("'"),
            ),
        )
    )
    problems.append(
        F.when(
            event_time.isNull(),
            F.concat(
                F.lit(f"event time '{tcol.column}' does not parse as {tcol.format}: '"),
                F.coalesce(F.col(tcol.column), F.lit("")),
                F.lit("'"),
            ),
        )
    )
    own_rule = {spec.label.column, tcol.column}
    problems += _type_errors({k: v for k, v in spec.events.columns.items() if k not in own_rule})
    return (
        raw.withColumn("event_time", event_time)
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
    """The entity's string id: its id column, or a stable hash of its ``key_from`` columns."""
    if entity.id is not None:
        return F.trim(F.col(entity.id))
    if len(entity.key_from) == 1:
        return F.trim(F.col(entity.key_from[0]))
    joined = F.concat_ws(
        _KEY_SEPARATOR, *[F.coalesce(F.col(c), F.lit("")) for c in entity.key_from]
    )
    return F.substring(F.sha2(joined, 256), 1, 16)


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
        raw_columns = list(spec.events.columns)
        joined = F.concat_ws(
            _KEY_SEPARATOR, *[F.coalesce(F.col(c), F.lit("")) for c in raw_columns]
        )
        event_id = F.substring(F.sha2(joined, 256), 1, 32)
    columns: list[Column] = [
        event_id.alias("event_id"),
        F.col("event_time"),
        entity_key(spec.user).alias("user_id"),
        entity_key(spec.context).alias("placement_id"),
        entity_key(spec.ad).alias("ad_id"),
        F.trim(F.col(spec.label.column)).cast("int").alias("label"),
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
