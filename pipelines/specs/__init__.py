"""Dataset specs: how one raw log layout maps onto deepclick's roles.

A spec (YAML) names, for a source nobody here wrote, which columns carry the event time, the label,
the user, the context (placement) and the ad, their features, and the side tables joined by key.
Ingest reads a source only through its spec, so supporting a new layout means writing a YAML file,
not code. Built-in specs live beside this module (``marketplace``, ``avazu``, ``taobao``,
``open_bandit``); ``load_spec`` also takes a path to any YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

BUILTIN_DIR = Path(__file__).parent

ColumnType = Literal["string", "int", "long", "double", "boolean"]
Role = Literal["user", "context", "ad"]
ROLE_PREFIX: dict[str, str] = {"user": "user__", "context": "ctx__", "ad": "ad__"}
ROLE_KEY: dict[str, str] = {"user": "user_id", "context": "placement_id", "ad": "ad_id"}
TABLE_ROLE: dict[str, Role] = {"users": "user", "placements": "context", "ads": "ad"}


class SpecError(ValueError):
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
    column: str
    format: str = Field(
        "unix_seconds",
        description="unix_seconds | unix_millis | iso | a Spark datetime pattern such as yyMMddHH",
    )
    timezone: str = Field("UTC", description="zone of wall-clock values; also for ctx__hour")


class Label(_Strict):
    column: str


class EntityRole(_Strict):
    """Where one role's key and features come from in the event rows."""

    id: str | None = None
    key_from: list[str] = Field(
        default_factory=list,
        description="when the log has no id column: the columns whose values make the key",
    )
    features: dict[str, Feature] = Field(default_factory=dict)

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
        uses = [("event_time", self.event_time.column), ("label", self.label.column)]
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
