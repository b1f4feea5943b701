"""The feature spec: the one description of features, written by the features stage, read by models
and serving (DESIGN.md, "One feature spec, read by both sides"; docs/contracts.md §3).

Pure Python + json (no Spark, no TensorFlow), so any component can import it. A model builds its
preprocessing from :class:`FeatureSpec` alone:

- ``categorical`` features are strings looked up in ``vocabulary_file`` (most frequent first) with
  ``oov_buckets`` extra buckets; a missing value (null or ``""``) is :data:`MISSING` (``default``).
- ``numeric`` features are ``log1p(max(x, 0))`` when ``log1p`` is set, then standardised with
  ``mean``/``std`` (:class:`NumericStats`; a feature constant in training standardises to 0) and
  clipped to ±:data:`CLIP_STD`; a missing value is ``default``, which standardises to 0 (history
  features: 0 counts and the prior CTR).

Both models build those transforms in one place, :mod:`models.preprocessing`.
- ``request_time`` features (``ctx__hour``, ``ctx__dow``) come with each request; every other
  feature of a role is held by that role's entity table (``entities``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepclick.errors import DeepclickError
from deepclick.layout import SPEC_FILE

FEATURE_TABLES: tuple[str, ...] = (
    "training/ranking",
    "training/retrieval",
    "eval",
    "entities/users",
    "entities/placements",
    "entities/ads",
    "popularity",
)
"""The Parquet tables every published features folder holds (docs/contracts.md §3)."""
MISSING = "__missing__"
"""What a missing (null or empty) categorical value becomes, in the tables and at serving."""

Role = Literal["user", "context", "ad"]
Kind = Literal["categorical", "numeric"]
Source = Literal["events", "side", "history"]

ROLES: tuple[Role, ...] = ("user", "context", "ad")
ROLE_PREFIX: dict[str, str] = {"user": "user__", "context": "ctx__", "ad": "ad__"}
ROLE_KEY: dict[str, str] = {"user": "user_id", "context": "placement_id", "ad": "ad_id"}
ROLE_ENTITY: dict[str, str] = {"user": "user", "context": "placement", "ad": "ad"}
ROLE_TABLE: dict[str, str] = {"user": "users", "context": "placements", "ad": "ads"}
REQUEST_TIME_FEATURES: tuple[str, ...] = ("ctx__hour", "ctx__dow")
HISTORY_SUFFIXES: tuple[str, ...] = ("hist_impressions", "hist_clicks", "hist_ctr")
CLIP_STD = 5.0
"""Standardised numeric inputs of every model are clipped to ±this many standard deviations, so an
unseen extreme (a new heavy advertiser's impression count) cannot push a network far outside what it
was trained on. One value for the towers and the ranker; why this one: ``models.preprocessing``."""


def standard_scale(std: float | None, mean: float = 0.0) -> float:
    """The factor a numeric feature is multiplied by after centring: ``1 / std``, or 0 for a
    feature that was constant over the training rows (``std`` 0, up to float noise).

    A constant input teaches the network nothing (its first-layer weights get no gradient) and
    keeps the weights it was initialised with; at serving the same feature varies — history counts
    are all zero on the first day of data and real afterwards — so scaling it by 1 would feed those
    untrained weights and shift every prediction. Scaling it by 0 keeps it at the value the
    network saw. ``None`` (a feature with no statistics) keeps the raw scale.
    """
    if std is None:
        return 1.0
    if std <= 1e-9 * max(1.0, abs(mean)):
        return 0.0
    return 1.0 / std


@dataclass(frozen=True)
class NumericStats:
    """How one numeric input is standardised: ``(f(x) - mean) / std``, ``f`` = log1p or identity
    (``std`` 0: constant in training, standardised to 0, see ``standard_scale``), clipped to
    ±``clip``; ``default`` is the raw value a missing (NaN) input takes (it standardises to 0 for
    spec features). The towers, the ranker and the ranker's LR baseline all standardise with it."""

    name: str
    mean: float
    std: float
    log1p: bool = False
    default: float = 0.0

    @classmethod
    def of(cls, feature: Feature) -> NumericStats:
        """The spec's standardisation of a numeric feature; a feature without a numeric default
        gets the raw value that standardises to 0 (``expm1(mean)`` after log1p, else ``mean``)."""
        mean = float(feature.mean or 0.0)
        std = 1.0 if feature.std is None else float(feature.std)
        default = feature.default
        if not isinstance(default, int | float) or math.isnan(default):
            default = math.expm1(mean) if feature.log1p else mean
        return cls(feature.name, mean, std, feature.log1p, float(default))

    @classmethod
    def fitted(cls, name: str, values: np.ndarray) -> NumericStats:
        """Statistics measured on training values (the similarity scores, which the spec does not
        describe: they come from the embeddings, after the features stage)."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else 0.0
        std = float(values.std()) if values.size else 0.0
        return cls(name, mean, std, False, mean)

    def standardize(self, values: np.ndarray, clip: float = CLIP_STD) -> np.ndarray:
        """The numpy twin of the models' in-graph transform (``models.preprocessing.Standardize``),
        for models outside Keras (the hashed-LR baseline): NaN → default, log1p, scale, clip."""
        x = np.asarray(values, dtype=np.float64)
        x = np.where(np.isnan(x), self.default, x)
        if self.log1p:
            x = np.log1p(np.maximum(x, 0.0))
        return np.clip((x - self.mean) * standard_scale(self.std, self.mean), -clip, clip)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mean": self.mean,
            "std": self.std,
            "log1p": self.log1p,
            "default": self.default,
        }


class FeatureSpecError(DeepclickError, ValueError):
    """A feature spec that is missing, malformed or asked for a feature it does not have."""


@dataclass(frozen=True)
class Feature:
    """One model input column, as found in every table of the features folder."""

    name: str
    role: Role
    kind: Kind
    dtype: str
    source: Source
    is_id: bool = False
    request_time: bool = False
    vocabulary_file: str | None = None
    vocabulary_size: int | None = None
    oov_buckets: int | None = None
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    log1p: bool = False
    default: str | float | None = None

    def to_json(self) -> dict[str, Any]:
        """The feature's JSON entry: categorical features omit numeric keys and vice versa."""
        entry = asdict(self)
        numeric_keys = ("mean", "std", "min", "max", "log1p")
        categorical_keys = ("vocabulary_file", "vocabulary_size", "oov_buckets")
        drop = categorical_keys if self.kind == "numeric" else numeric_keys
        for key in drop:
            entry.pop(key)
        if not self.is_id:
            entry.pop("is_id")
        if not self.request_time:
            entry.pop("request_time")
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Feature:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in entry.items() if k in known})


@dataclass(frozen=True)
class EntitySpec:
    """One entity table: its key and the feature columns it holds (profile + history)."""

    name: str
    role: Role
    key: str
    table: str
    features: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "role": self.role,
            "table": self.table,
            "features": list(self.features),
        }


@dataclass(frozen=True)
class FeatureSpec:
    """Everything a model or a server needs to know about the features of one version."""

    version: str
    dataset: str
    target_date: str
    train_dates: tuple[str, ...]
    global_ctr: float
    ctr_prior_strength: float
    features: tuple[Feature, ...]
    entities: dict[str, EntitySpec]
    label: str = "label"
    missing_value: str = MISSING
    folder: Path | None = field(default=None, compare=False)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def categorical(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def numeric(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "numeric"]

    def feature(self, name: str) -> Feature:
        for candidate in self.features:
            if candidate.name == name:
                return candidate
        raise FeatureSpecError(
            f"feature spec {self.version}: no feature {name!r} (features: {', '.join(self.names)})"
        )

    def by_role(self, role: str) -> list[Feature]:
        """The features of one role (``user``, ``context``, ``ad``), in spec order."""
        if role not in ROLES:
            raise FeatureSpecError(f"unknown role {role!r}: roles are {', '.join(ROLES)}")
        return [f for f in self.features if f.role == role]

    def vocabulary_path(self, name: str) -> Path:
        feature = self.feature(name)
        if feature.vocabulary_file is None:
            raise FeatureSpecError(f"feature {name!r} is {feature.kind}: it has no vocabulary")
        if self.folder is None:
            raise FeatureSpecError("this feature spec was not loaded from a folder")
        return self.folder / feature.vocabulary_file

    def vocabulary(self, name: str) -> list[str]:
        """The vocabulary of a categorical feature, most frequent first."""
        text = self.vocabulary_path(name).read_text(encoding="utf-8")
        return text.split("\n")[:-1] if text else []

    def table_path(self, table: str) -> Path:
        """A table of the features folder, e.g. ``entities/ads`` or ``training/ranking``."""
        if self.folder is None:
            raise FeatureSpecError("this feature spec was not loaded from a folder")
        return self.folder / table

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "dataset": self.dataset,
            "target_date": self.target_date,
            "train_dates": list(self.train_dates),
            "label": self.label,
            "global_ctr": self.global_ctr,
            "ctr_prior_strength": self.ctr_prior_strength,
            "missing_value": self.missing_value,
            "entities": {name: e.to_json() for name, e in self.entities.items()},
            "features": [f.to_json() for f in self.features],
        }

    def write(self, folder: Path) -> Path:
        path = folder / SPEC_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, raw: dict[str, Any], folder: Path | None = None) -> FeatureSpec:
        try:
            entities = {
                name: EntitySpec(
                    name=name,
                    role=e["role"],
                    key=e["key"],
                    table=e["table"],
                    features=tuple(e["features"]),
                )
                for name, e in raw["entities"].items()
            }
            return cls(
                version=str(raw["version"]),
                dataset=raw["dataset"],
                target_date=raw["target_date"],
                train_dates=tuple(raw["train_dates"]),
                global_ctr=float(raw["global_ctr"]),
                ctr_prior_strength=float(raw["ctr_prior_strength"]),
                features=tuple(Feature.from_json(f) for f in raw["features"]),
                entities=entities,
                label=raw.get("label", "label"),
                missing_value=raw.get("missing_value", MISSING),
                folder=folder,
            )
        except (KeyError, TypeError) as exc:
            where = f" in {folder / SPEC_FILE}" if folder else ""
            raise FeatureSpecError(f"malformed feature spec{where}: {exc!r}") from None


def load_feature_spec(folder: Path | str) -> FeatureSpec:
    """Read ``feature_spec.json`` from a published features folder."""
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file():
        raise FeatureSpecError(f"{folder} has no {SPEC_FILE}: is it a published features folder?")
    return FeatureSpec.from_json(json.loads(path.read_text(encoding="utf-8")), folder=folder)
