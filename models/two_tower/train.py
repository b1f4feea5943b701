"""Train the two-tower model on a published features folder (``training/retrieval``).

:func:`train_two_tower` is the one entry point: it reads the clicked impressions with pandas,
builds the towers from the feature spec, fits the logQ-corrected in-batch softmax (plus, with
``uniform_negatives``, ads drawn uniformly from ``entities/ads``: mixed negatives) with Keras and
returns :class:`TrainedTowers` — the towers, the additive offsets that fold request time into the
context vector (see ``model.py``) and the training history. Runs are seeded
(``keras.utils.set_random_seed`` plus a seeded shuffle), so the same folder and settings give the
same vectors.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from deepclick.settings import TwoTowerSettings
from models.feature_spec import ROLE_KEY, Feature, FeatureSpec, FeatureSpecError
from models.fitting import build_before_fit, shuffled_batches
from models.two_tower.model import TwoTowerModel, additive_offsets
from models.two_tower.preprocessing import input_array, input_dtype
from models.two_tower.towers import TOWER_ROLES, Tower, tower_features

RETRIEVAL_TABLE = "training/retrieval"
AD_TABLE = "entities/ads"
LOG_Q_COLUMN = "ad_log_q"
EMBED_BATCH = 8192


@dataclass
class TrainedTowers:
    """A trained two-tower model ready to embed entities or to be exported.

    ``offsets`` are added to each tower's output wherever a vector leaves the model (embedding
    here, SavedModels in ``export.py``): they fold the mean time vector into ``context``.
    """

    spec: FeatureSpec
    settings: TwoTowerSettings
    model: TwoTowerModel
    offsets: dict[str, np.ndarray]
    history: dict[str, list[float]] = field(default_factory=dict)
    examples: int = 0
    seconds: float = 0.0
    dates: tuple[str, ...] | None = None
    """The training days it learned from (None: every day of the window)."""

    @property
    def roles(self) -> tuple[str, ...]:
        """The towers this model has, in export order (``time`` only with request-time features)."""
        return tuple(role for role in TOWER_ROLES if role in self.model.towers)

    @property
    def dim(self) -> int:
        return self.model.ad_tower.embedding_dim

    @property
    def examples_per_second(self) -> float:
        """Training throughput: examples × epochs / wall-clock seconds of ``fit``."""
        return self.examples * self.settings.epochs / self.seconds if self.seconds else 0.0

    def tower(self, role: str) -> Tower:
        if role not in self.model.towers:
            raise KeyError(f"no {role} tower: this model has {', '.join(self.roles)}")
        return self.model.towers[role]

    def features(self, role: str) -> list[Feature]:
        """The raw features the ``role`` tower takes, in its input order."""
        return list(self.tower(role).features)

    def serving_function(self, role: str) -> Callable[[Mapping[str, tf.Tensor]], tf.Tensor]:
        """Raw feature tensors → the vector the embeddings contract publishes for ``role``."""
        tower = self.tower(role)
        offset = tf.constant(self.offsets[role], dtype=tf.float32)

        def embed(inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
            return tower(inputs) + offset

        return embed

    def embed(self, role: str, frame: pd.DataFrame | Mapping[str, object]) -> np.ndarray:
        """float32 ``[n, dim]`` vectors of the rows of ``frame`` (raw feature values)."""
        fn = self.serving_function(role)
        inputs = {f.name: input_array(frame[f.name], input_dtype(f)) for f in self.features(role)}
        n = len(next(iter(inputs.values())))
        parts = [
            np.asarray(fn({k: v[i : i + EMBED_BATCH] for k, v in inputs.items()}))
            for i in range(0, n, EMBED_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def build_towers(spec: FeatureSpec, settings: TwoTowerSettings) -> dict[str, Tower]:
    """One tower per role the spec has features for (the time tower is linear: it is small)."""
    towers: dict[str, Tower] = {}
    for role in TOWER_ROLES:
        features = tower_features(
            spec, role, exclude=settings.exclude_features, history=settings.history_features
        )
        if role == "time" and not features:
            continue
        towers[role] = Tower(
            spec,
            role,
            features,
            embedding_dim=settings.embedding_dim,
            feature_embedding_dim=settings.feature_embedding_dim,
            hidden_units=() if role == "time" else settings.hidden_units,
            id_dropout=settings.id_dropout,
            seed=settings.seed,
        )
    return towers


def read_retrieval(
    spec: FeatureSpec, columns: list[str], dates: Sequence[str] | None = None
) -> pd.DataFrame:
    """The named columns of ``training/retrieval`` (only the rows of ``dates``, when given).

    Raises:
        FeatureSpecError: the table is missing, empty, or lacks a column the towers need.
    """
    path = spec.table_path(RETRIEVAL_TABLE)
    if not path.exists():
        raise FeatureSpecError(f"{path} does not exist: is {spec.folder} a features folder?")
    import pyarrow.parquet as pq

    available = set(pq.ParquetDataset(path).schema.names)
    missing = [c for c in columns if c not in available]
    if missing:
        raise FeatureSpecError(
            f"{path} lacks columns {', '.join(missing)} that the two-tower model needs"
        )
    filters = None
    if dates is not None:
        filters = [("date", "in", [dt.date.fromisoformat(d) for d in dates])]
    frame = pd.read_parquet(path, columns=columns, filters=filters)
    if len(frame) < 2:
        where = "" if dates is None else f" on {', '.join(dates)}"
        raise FeatureSpecError(
            f"{path} has {len(frame)} clicked rows{where}; training needs at least 2"
        )
    return frame


def read_catalogue(spec: FeatureSpec, ad_tower: Tower) -> dict[str, np.ndarray]:
    """The ad tower's raw inputs (and the ad id) for every ad of ``entities/ads``: the pool the
    uniform negatives are drawn from, ads never clicked included.

    Raises:
        FeatureSpecError: the table is missing or empty.
    """
    path = spec.table_path(AD_TABLE)
    if not path.exists():
        raise FeatureSpecError(
            f"{path} does not exist: uniform negatives need the ad catalogue of the features folder"
        )
    ad_key = ROLE_KEY["ad"]
    columns = sorted({f.name for f in ad_tower.features} | {ad_key})
    frame = pd.read_parquet(path, columns=columns)
    if frame.empty:
        raise FeatureSpecError(f"{path} holds no ads: uniform negatives need at least one")
    catalogue = {f.name: input_array(frame[f.name], input_dtype(f)) for f in ad_tower.features}
    catalogue.setdefault(ad_key, input_array(frame[ad_key], tf.string))
    return catalogue


def training_inputs(frame: pd.DataFrame, towers: Mapping[str, Tower]) -> dict[str, np.ndarray]:
    """Tower inputs plus the ad key and ``ad_log_q`` the loss reads, as numpy columns."""
    inputs: dict[str, np.ndarray] = {}
    for tower in towers.values():
        for feature in tower.features:
            inputs[feature.name] = input_array(frame[feature.name], input_dtype(feature))
    ad_key = ROLE_KEY["ad"]
    inputs.setdefault(ad_key, input_array(frame[ad_key], tf.string))
    inputs[LOG_Q_COLUMN] = frame[LOG_Q_COLUMN].to_numpy(dtype=np.float32)
    return inputs


def train_two_tower(
    spec: FeatureSpec,
    settings: TwoTowerSettings,
    *,
    progress: bool = True,
    dates: Sequence[str] | None = None,
) -> TrainedTowers:
    """Fit the towers on the clicked impressions of ``spec``'s features folder.

    Args:
        spec: a feature spec loaded from a published features folder (``spec.folder`` set).
        settings: sizes, optimisation and seed.
        progress: show Keras progress bars.
        dates: train on these days of the window only (default: every training day).

    Returns:
        the trained towers with their offsets, per-epoch ``loss`` history and timing.
    """
    keras.utils.set_random_seed(settings.seed)
    towers = build_towers(spec, settings)
    needed = {f.name for tower in towers.values() for f in tower.features}
    columns = [*sorted(needed | {ROLE_KEY["ad"]}), LOG_Q_COLUMN]
    inputs = training_inputs(read_retrieval(spec, columns, dates), towers)
    n = len(inputs[LOG_Q_COLUMN])
    batch_size = min(settings.batch_size, n)
    dataset = shuffled_batches(inputs, batch_size, settings.seed, drop_remainder=True)
    catalogue = read_catalogue(spec, towers["ad"]) if settings.uniform_negatives else None
    model = TwoTowerModel(
        towers,
        temperature=settings.temperature,
        catalogue=catalogue,
        uniform_negatives=settings.uniform_negatives,
        seed=settings.seed,
    )
    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), jit_compile=False)
    build_before_fit(model, inputs)
    started = time.perf_counter()
    fitted = model.fit(dataset, epochs=settings.epochs, verbose=1 if progress else 0, shuffle=False)
    seconds = time.perf_counter() - started
    time_inputs = None
    if "time" in towers:
        time_inputs = {f.name: inputs[f.name] for f in towers["time"].features}
    return TrainedTowers(
        spec=spec,
        settings=settings,
        model=model,
        offsets=additive_offsets(model, time_inputs),
        history={k: [float(v) for v in vs] for k, vs in fitted.history.items()},
        examples=n,
        seconds=seconds,
        dates=None if dates is None else tuple(dates),
    )
