"""Dataset specs: how one raw log layout maps onto deepclick's roles.

A spec (YAML) names, for a source nobody here wrote, which columns carry the event time, the label,
the user, the context (placement) and the ad, their features, and the side tables joined by key.
Ingest reads a source only through its spec, so supporting a new layout means writing a YAML file,
not code — including what real logs need beyond a column mapping: which label values are a click,
what an empty key means, whether identical lines are re-deliveries, where the time comes from
(one column, a date and an hour, or row order) and how much quarantine is too much. Built-in specs
live beside this module (``marketplace``, ``avazu``, ``taobao``, ``open_bandit``,
``talkingdata``); ``load_spec`` also takes a path to any YAML file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from deepclick.errors import DeepclickError

BUILTIN_DIR = Path(__file__).parent

ColumnType = Literal["string", "int", "long", "double", "boolean"]
Role = Literal["user", "context", "ad"]
ROLE_PREFIX: dict[str, str] = {"user": "user__", "context": "ctx__", "ad": "ad__"}
ROLE_KEY: dict[str, str] = {"user": "user_id", "context": "placement_id", "ad": "ad_id"}
TABLE_ROLE: dict[str, Role] = {"users": "user", "placements": "context", "ads": "ad"}


class SpecError(DeepclickError, ValueError):
    """A dataset spec that cannot describe its source; the message names the spec and the column."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _feature_shorthand(value: Any) -> Any:
    """Allow ``price: numeric`` as shorthand for ``price: {kind: numeric}``."""
    return {"kind": value} if isinstance(value, str) else value


class FeatureDef(_Strict):
    kind: Literal["categorical", "numeric"]
    log1p: bool = False


Feature = Annotated[FeatureDef, BeforeValidator(_feature_shorthand)]


class EventTime(_Strict):
    """When each event happened, declared one of three ways (exactly one must be given):

    - ``column`` (+ ``format``): one timestamp column;
    - ``date_column`` + ``hour_column`` (+ ``date_format``): a day and an hour of day (0-23);
    - ``start`` + ``rows_per_day``: no time in the log at all; row *i* of the files (in name
      order) is on day ``start + i // rows_per_day``, spread evenly over that day.
    """

    column: str | None = None
    format: str = Field(
        "unix_seconds",
        description="unix_seconds | unix_millis | iso | a Spark datetime pattern such as yyMMddHH",
    )
    date_column: str | None = None
    date_format: str = Field("yyyy-MM-dd", description="Spark datetime pattern of date_column")
    hour_column: str | None = None
    start: dt.date | None = Field(None, description="row order: the day of the first row")
    rows_per_day: int | None = Field(None, ge=1, description="row order: rows of each day")
    timezone: str = Field("UTC", description="zone of wall-clock values; also for ctx__hour")

    @model_validator(mode="after")
    def _one_way(self) -> EventTime:
        ways = {
            "column": self.column is not None,
            "date_column + hour_column": self.date_column is not None
            or self.hour_column is not None,
            "start + rows_per_day": self.start is not None or self.rows_per_day is not None,
        }
        chosen = [name for name, given in ways.items() if given]
        if len(chosen) != 1:
            raise ValueError(
                "give exactly one of 'column', 'date_column + hour_column' or "
                f"'start + rows_per_day' (given: {', '.join(chosen) or 'none'})"
            )
        if chosen[0] == "date_column + hour_column" and None in (
            self.date_column,
            self.hour_column,
        ):
            raise ValueError("'date_column' and 'hour_column' go together")
        if chosen[0] == "start + rows_per_day" and None in (self.start, self.rows_per_day):
            raise ValueError("'start' and 'rows_per_day' go together")
        return self

    @property
    def columns(self) -> list[str]:
        """The source columns the event time is read from (none for row order)."""
        return [c for c in (self.column, self.date_column, self.hour_column) if c is not None]

    @property
    def row_order(self) -> bool:
        return self.start is not None

    def describe(self) -> str:
        """How the time is read, for messages: ``'hour' as yyMMddHH``."""
        if self.column is not None:
            return f"'{self.column}' as {self.format}"
        if self.date_column is not None:
            return f"'{self.date_column}' ({self.date_format}) + hour '{self.hour_column}'"
        return f"row order from {self.start} at {self.rows_per_day} rows per day"


class Label(_Strict):
    """Which values of ``column`` are a click. By default 1 is a click and 0 is not; any other
    value is quarantined. ``positive``/``negative`` list other encodings (``negative: null``
    takes every other non-empty value as no click); ``threshold`` reads a number and counts
    values at or above it as clicks."""

    column: str
    positive: list[str] = Field(default_factory=lambda: ["1"])
    negative: list[str] | None = Field(default_factory=lambda: ["0"])
    threshold: float | None = None

    @model_validator(mode="after")
    def _one_mapping(self) -> Label:
        if self.threshold is not None and (self.positive != ["1"] or self.negative != ["0"]):
            raise ValueError("give either 'threshold' or 'positive'/'negative', not both")
        if not self.positive:
            raise ValueError("'positive' must list at least one value")
        overlap = set(self.positive) & set(self.negative or [])
        if overlap:
            raise ValueError(f"values {sorted(overlap)} are both positive and negative")
        return self


class MissingKey(_Strict):
    """What an event whose key is empty becomes: ``quarantine`` (default), or ``value`` (one
    entity standing for every unknown one)."""

    action: Literal["quarantine", "value"] = "quarantine"
    value: str | None = None

    @model_validator(mode="after")
    def _value_given(self) -> MissingKey:
        if (self.action == "value") != bool(self.value and self.value.strip()):
            raise ValueError("'value' is the non-empty key of unknown entities (action value)")
        return self


def _missing_shorthand(value: Any) -> Any:
    """``missing: quarantine`` / ``missing: unknown`` / ``missing: {value: anonymous}``."""
    if value == "quarantine":
        return {"action": "quarantine"}
    if value == "unknown":
        return {"action": "value", "value": UNKNOWN_KEY}
    if isinstance(value, dict) and "value" in value and "action" not in value:
        return {"action": "value", **value}
    return value


UNKNOWN_KEY = "__unknown__"
"""The key an empty key becomes under ``missing: unknown``: one entity for all unknown ones."""


class EntityRole(_Strict):
    """Where one role's key and features come from in the event rows."""

    id: str | None = None
    key_from: list[str] = Field(
        default_factory=list,
        description="when the log has no id column: the columns whose values make the key",
    )
    features: dict[str, Feature] = Field(default_factory=dict)
    missing: Annotated[MissingKey, BeforeValidator(_missing_shorthand)] = Field(
        default_factory=MissingKey,
        description="an empty key: quarantine (default), unknown, or {value: <key>}",
    )

    @model_validator(mode="after")
    def _one_key(self) -> EntityRole:
        if (self.id is None) == (not self.key_from):
            raise ValueError("give exactly one of 'id' or 'key_from'")
        return self

    @property
    def key_columns(self) -> list[str]:
        return [self.id] if self.id is not None else list(self.key_from)


class SourceFile(_Strict):
    file: str = Field(description="file name or glob, relative to the --source folder")
    columns: dict[str, ColumnType] = Field(
        description="the columns the spec uses, with their types; a file with a header may hold "
        "more (they are ignored); a file without a header must list every column in file order"
    )


class SideTable(SourceFile):
    key: str
    features: dict[str, Feature] = Field(default_factory=dict)


class DatasetSpec(_Strict):
    name: str
    description: str = ""
    format: Literal["csv", "tsv", "parquet"] = "csv"
    header: bool = True
    events: SourceFile
    event_id: str | None = None
    event_time: EventTime
    label: Label
    user: EntityRole
    context: EntityRole
    ad: EntityRole
    tables: dict[Literal["users", "placements", "ads"], SideTable] = Field(default_factory=dict)
    duplicates: Literal["keep", "drop_exact"] | None = Field(
        None,
        description="rows whose raw values are all equal: drop_exact keeps one (re-deliveries), "
        "keep keeps all (logs at hour granularity repeat lines legitimately); default: "
        "drop_exact with an event_id, keep without",
    )
    max_field_chars: int = Field(
        4096, ge=1, description="rows holding a longer value are quarantined, never written"
    )
    max_quarantined_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="an ingest that quarantines a larger share of its rows fails, publishing "
        "nothing (a label or time declared wrong)",
    )

    @property
    def drop_duplicates(self) -> bool:
        if self.duplicates is None:
            return self.event_id is not None
        return self.duplicates == "drop_exact"

    @model_validator(mode="after")
    def _columns_exist(self) -> DatasetSpec:
        columns = self.events.columns
        for role, column in self._event_column_uses():
            if column not in columns:
                raise ValueError(
                    f"column {column!r} named for role {role} is not in the events columns "
                    f"(columns: {', '.join(columns)})"
                )
        for table_name, table in self.tables.items():
            for role, column in [("key", table.key)] + [("features", c) for c in table.features]:
                if column not in table.columns:
                    raise ValueError(
                        f"column {column!r} named for tables.{table_name}.{role} is not in that "
                        f"table's columns (columns: {', '.join(table.columns)})"
                    )
        return self

    def _event_column_uses(self) -> list[tuple[str, str]]:
        uses = [("event_time", c) for c in self.event_time.columns]
        uses.append(("label", self.label.column))
        if self.event_id:
            uses.append(("event_id", self.event_id))
        for role in ("user", "context", "ad"):
            entity: EntityRole = getattr(self, role)
            uses += [(f"{role}.id", c) for c in ([entity.id] if entity.id else [])]
            uses += [(f"{role}.key_from", c) for c in entity.key_from]
            uses += [(f"{role}.features", c) for c in entity.features]
        return uses

    def event_features(self) -> list[dict[str, Any]]:
        """Canonical feature columns taken from event rows, with role, kind and dtype.

        ``ctx__hour`` and ``ctx__dow`` (derived from the event time) are always present: the
        context is the placement *plus time*.
        """
        result: list[dict[str, Any]] = [
            {"name": "ctx__hour", "role": "context", "kind": "categorical", "dtype": "string"},
            {"name": "ctx__dow", "role": "context", "kind": "categorical", "dtype": "string"},
        ]
        for role in ("user", "context", "ad"):
            entity: EntityRole = getattr(self, role)
            for column, feature in entity.features.items():
                result.append(self._feature_entry(role, column, feature, self.events.columns))
        return result

    def table_features(self, table: str) -> list[dict[str, Any]]:
        side = self.tables[table]  # type: ignore[index]
        role = TABLE_ROLE[table]
        return [self._feature_entry(role, c, f, side.columns) for c, f in side.features.items()]

    @staticmethod
    def _feature_entry(
        role: str, column: str, feature: FeatureDef, columns: dict[str, ColumnType]
    ) -> dict[str, Any]:
        dtype = "string" if feature.kind == "categorical" else "double"
        entry: dict[str, Any] = {
            "name": canonical_name(role, column),
            "column": column,
            "role": role,
            "kind": feature.kind,
            "dtype": dtype,
            "source_type": columns[column],
        }
        if feature.log1p:
            entry["log1p"] = True
        return entry


def canonical_name(role: str, column: str) -> str:
    """``user__age_level``: role prefix plus the source column, so names never collide."""
    return ROLE_PREFIX[role] + column


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Load a built-in spec by name or any spec file by path; errors name the spec and the rule."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SpecError(
                f"unknown dataset spec {str(name_or_path)!r}: built-in specs are "
                f"{', '.join(builtin_specs())}, or pass a path to a YAML file"
            )
    if not path.is_file():
        raise SpecError(f"dataset spec file {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: Any, origin: str = "<memory>") -> DatasetSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"dataset spec {origin}: expected a mapping at the top level")
    label = raw.get("name", origin)
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {where!r}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {msg}" if where else msg)
        raise SpecError(f"dataset spec {label!r}: {'; '.join(problems)}") from None
