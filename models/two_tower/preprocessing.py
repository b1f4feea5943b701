"""Feature encoders built from the feature spec, living inside the towers.

The exported towers take raw values (strings for categorical features, floats for numeric ones),
so the lookup and the standardisation must be part of the model: the very same graph maps an id to
its row at training time, in the Spark embed job and at serving. Everything here is derived from
:class:`~models.feature_spec.FeatureSpec` alone (STYLE.md §5); nothing re-lists feature names.

- categorical: ``StringLookup`` over the vocabulary file with ``oov_buckets`` hashed OOV indices,
  then an ``Embedding``. Empty strings are read as the spec's missing value first, so a request
  that sends ``""`` and a table that stored ``__missing__`` land on the same row.
- numeric: missing (NaN) → the spec's ``default``; ``log1p(max(x, 0))`` when flagged; then
  ``(x - mean) / std`` (0 for a feature constant in training: ``standard_scale``), clipped to
  ±:data:`CLIP_STD` so a value far outside the training range (a huge count at serving) cannot
  blow up the tower.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from models.feature_spec import Feature, FeatureSpec, standard_scale

CLIP_STD = 5.0
"""Standardised numeric inputs are clipped to this many standard deviations."""


class CategoricalEncoder(keras.layers.Layer):
    """String → vocabulary index (with hashed OOV buckets) → dense embedding ``[batch, dim]``.

    ``dropout`` (training only) zeroes the embedding of a random share of rows. Used on id
    features, it teaches the tower to place an entity from its other features alone — which is
    all a new ad or user has (its id is OOV, whose embedding stays near its small initial value).
    """

    def __init__(
        self,
        vocabulary: list[str],
        oov_buckets: int,
        output_dim: int,
        missing_value: str,
        dropout: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.missing_value = missing_value
        self.dropout = float(dropout)
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout > 0 else None
        self.lookup = keras.layers.StringLookup(
            vocabulary=vocabulary, num_oov_indices=max(1, oov_buckets), name="lookup"
        )
        self.embedding = keras.layers.Embedding(
            input_dim=self.lookup.vocabulary_size(), output_dim=output_dim, name="embedding"
        )

    def call(self, values: tf.Tensor, training: bool = False) -> tf.Tensor:
        values = tf.reshape(tf.convert_to_tensor(values, dtype=tf.string), [-1])
        values = tf.where(tf.equal(values, ""), self.missing_value, values)
        embedded = self.embedding(self.lookup(values))
        if training and self.seed_generator is not None:
            keep = keras.random.uniform(tf.shape(values), seed=self.seed_generator)
            embedded *= tf.cast(keep >= self.dropout, embedded.dtype)[:, None]
        return embedded


class NumericEncoder(keras.layers.Layer):
    """Raw float → the spec's standardised value ``[batch, 1]`` (missing → default first)."""

    def __init__(self, mean: float, std: float, log1p: bool, default: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean = float(mean)
        self.std = float(std)
        self.scale = standard_scale(self.std, self.mean)
        self.log1p = bool(log1p)
        self.default = float(default)

    def call(self, values: tf.Tensor) -> tf.Tensor:
        values = tf.reshape(tf.cast(values, tf.float32), [-1, 1])
        values = tf.where(tf.math.is_nan(values), self.default, values)
        if self.log1p:
            values = tf.math.log1p(tf.maximum(values, 0.0))
        scaled = (values - self.mean) * self.scale
        return tf.clip_by_value(scaled, -CLIP_STD, CLIP_STD)


def clean_vocabulary(values: list[str]) -> list[str]:
    """The vocabulary as ``StringLookup`` accepts it: no duplicates, no empty string, no OOV token.

    Dropped entries simply fall into the OOV buckets; the index a value gets is internal to the
    tower, so this changes nothing outside it.
    """
    seen: set[str] = set()
    kept: list[str] = []
    for value in values:
        if value and value != "[UNK]" and value not in seen:
            seen.add(value)
            kept.append(value)
    return kept


def build_encoder(
    spec: FeatureSpec,
    feature: Feature,
    embedding_dim: int,
    *,
    id_dropout: float = 0.0,
    seed: int | None = None,
) -> keras.layers.Layer:
    """The encoder of one spec feature (vocabularies are read from ``spec.folder``).

    ``id_dropout`` applies to id features only (see :class:`CategoricalEncoder`).
    """
    name = f"encode_{feature.name}"
    if feature.kind == "categorical":
        return CategoricalEncoder(
            vocabulary=clean_vocabulary(spec.vocabulary(feature.name)),
            oov_buckets=feature.oov_buckets or 1,
            output_dim=embedding_dim,
            missing_value=str(feature.default or spec.missing_value),
            dropout=id_dropout if feature.is_id else 0.0,
            seed=seed,
            name=name,
        )
    default = feature.default if isinstance(feature.default, int | float) else feature.mean
    return NumericEncoder(
        mean=feature.mean or 0.0,
        std=1.0 if feature.std is None else feature.std,
        log1p=feature.log1p,
        default=float(default or 0.0),
        name=name,
    )


def input_dtype(feature: Feature) -> tf.DType:
    """The dtype a tower input of this feature has: strings for categorical, float32 otherwise."""
    return tf.string if feature.kind == "categorical" else tf.float32


def input_array(values: object, dtype: tf.DType) -> np.ndarray:
    """Raw column values (a pandas Series, list or array) as the numpy array a tower input takes.

    Strings: nulls become ``""`` (read as missing by the tower); integer-valued floats are written
    without ``.0`` (a pandas int column with nulls turns float, and ``13.0`` must still find the
    vocabulary entry ``13``). Numbers: float32, unparseable or null → NaN (the spec default).
    """
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    if dtype == tf.string:
        if pd.api.types.is_float_dtype(series.dtype):
            finite = series.dropna()
            if (finite == finite.round()).all():
                series = series.astype("Int64")
        mask = series.isna()
        text = series.astype(str).to_numpy(dtype=object)
        text[mask.to_numpy()] = ""
        return text
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
