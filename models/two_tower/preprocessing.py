"""Feature encoders of the towers: the shared preprocessing (:mod:`models.preprocessing`) plus, for
categorical features, the embedding the tower learns.

The exported towers take raw values (strings for categorical features, floats for numeric ones),
so the lookup and the standardisation are part of the model: the very same graph maps an id to its
row at training time, in the Spark embed job and at serving — and the ranker maps a raw value
exactly as the towers do, because both build their lookups and standardisation in
:mod:`models.preprocessing` from :class:`~models.feature_spec.FeatureSpec` alone (STYLE.md §5).

- categorical: :class:`~models.preprocessing.Lookup` (``""`` → missing marker, vocabulary, hashed
  OOV buckets), then an ``Embedding``.
- numeric: :class:`~models.preprocessing.Standardize` of one column (NaN → default, log1p,
  standardise, clip), ``[batch, 1]``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from models.feature_spec import Feature, FeatureSpec, NumericStats
from models.preprocessing import Lookup, categorical_lookup, numeric_standardize
from models.raw_values import number_values, text_values

NO_ID = "__deepclick_no_id__"
"""The value that asks an id encoder for "no id": the zeroed embedding id dropout trains (never a
vocabulary entry). The embed stage gives it to the ads without training rows
(:mod:`pipelines.embed`)."""


class CategoricalEncoder(keras.layers.Layer):
    """String → vocabulary index (the shared :class:`Lookup`) → dense embedding ``[batch, dim]``.

    ``dropout`` (training only) zeroes the embedding of a random share of rows. Used on id
    features, it teaches the tower to place an entity from its other features alone — which is
    all a new ad or user has. That zeroed embedding is what :data:`NO_ID` gets, in training and
    in the exported graph, when the encoder has dropout (without it the tower never saw a zeroed
    id, and :data:`NO_ID` is an unknown id like any other).

    Why not the OOV rows: the fit trains them on the rare ids below the vocabulary's
    ``min_count``, so an id the towers never saw would inherit what the rarest ads taught (in the
    medium world a known ad scored -6.2 with D's users under an unknown id, -2.2 under its own).
    Zeroing the OOV rows themselves also moves those rare ads and users, which cost the demo's
    funnel at K = 50 (docs/history/model-quality.md, sessions 20 and 21), so they keep their rows.
    """

    def __init__(
        self,
        lookup: Lookup,
        output_dim: int,
        dropout: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.dropout = float(dropout)
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout > 0 else None
        self.lookup = lookup
        self.embedding = keras.layers.Embedding(
            input_dim=self.lookup.vocabulary_size(), output_dim=output_dim, name="embedding"
        )

    def call(self, values: tf.Tensor, training: bool = False) -> tf.Tensor:
        values = tf.reshape(tf.convert_to_tensor(values, dtype=tf.string), [-1])
        embedded = self.embedding(self.lookup(values))
        if self.seed_generator is not None:
            embedded *= tf.cast(tf.not_equal(values, NO_ID), embedded.dtype)[:, None]
        if training and self.seed_generator is not None:
            keep = keras.random.uniform(tf.shape(values), seed=self.seed_generator)
            embedded *= tf.cast(keep >= self.dropout, embedded.dtype)[:, None]
        return embedded


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
            lookup=categorical_lookup(spec, feature, name="lookup"),
            output_dim=embedding_dim,
            dropout=id_dropout if feature.is_id else 0.0,
            seed=seed,
            name=name,
        )
    return numeric_standardize([NumericStats.of(feature)], name=name)


def input_dtype(feature: Feature) -> tf.DType:
    """The dtype a tower input of this feature has: strings for categorical, float32 otherwise."""
    return tf.string if feature.kind == "categorical" else tf.float32


def input_array(values: object, dtype: tf.DType) -> np.ndarray:
    """Raw column values (a pandas Series, list or array) as the numpy array a tower input takes
    (:mod:`models.raw_values`): strings with null → ``""`` (read as missing by the tower), or
    float32 with null/unparseable → NaN (the spec default)."""
    return text_values(values) if dtype == tf.string else number_values(values)
