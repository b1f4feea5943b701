"""The one spec-driven preprocessing of every model: categorical lookup and numeric standardisation.

Both exported models (the towers and the ranker) take raw values and carry their preprocessing in
the graph, so training, the Spark embed job, in-process serving and TF Serving share one mapping
(DESIGN.md, "One feature spec, read by both sides"). Both build it here, from
:class:`~models.feature_spec.FeatureSpec` alone, so a raw value means the same thing to both:

- **categorical** (:class:`Lookup`): ``""`` → the spec's missing marker (``__missing__``, what the
  tables store for null), then the vocabulary (:func:`clean_vocabulary`: file order, duplicates,
  ``""`` and :data:`OOV_TOKEN` dropped, an empty file → the marker alone) after ``oov_buckets``
  hashed OOV indices. Index ``i`` is ``oov_buckets + `` the entry's position; an unseen value is
  hashed into ``0..oov_buckets-1``.
- **numeric** (:class:`Standardize`, from :class:`~models.feature_spec.NumericStats`): NaN → the
  feature's default, ``log1p(max(x, 0))`` when flagged, ``(x - mean) / std`` (0 for a feature
  constant in training), clipped to ±:data:`~models.feature_spec.CLIP_STD`.

Host-side conversion of columns (null → ``""``/NaN, ``13.0`` → ``"13"``) is
:mod:`models.raw_values`, which imports no TensorFlow.

Before this module the two models drifted: the towers clipped at ±5 and the ranker at ±10; the
towers mapped ``""`` to the missing marker in the graph and the ranker hashed it into an OOV bucket
(its host code mapped it first, a raw TF Serving client did not); the towers' OOV token was
StringLookup's ``[UNK]``; a numeric feature without a default took ``mean`` as a raw value in the
towers (not the value that standardises to 0 after log1p). Shared now: the ranker's numeric
default, OOV token and empty-vocabulary rule, the towers' vocabulary cleaning and empty-string rule,
and the clip chosen by measurement (below).

Measured, the clip (``docs/contracts.md`` §3 holds the table and the command): a demo world
(4 days × 20k, seed 7, D = 2024-01-04, 675 clicks), ranker AUC on D with ranker seeds 7 / 8:
±5 0.6966 / 0.6997, ±10 0.6950 / 0.6997, none 0.6965 / 0.6996; paired differences to ±5 within
[−0.0033, +0.0015], below the seed-to-seed change (0.0031). Not measurable, so the shared clip is
the towers' ±5, which leaves the towers unchanged (their numeric inputs stay within ±4.3 there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from models.feature_spec import CLIP_STD, Feature, FeatureSpec, NumericStats, standard_scale

OOV_TOKEN = "__deepclick_oov__"
"""StringLookup's name for out-of-vocabulary values (never a vocabulary entry). Only the name of the
OOV indices: an unseen value's index is a hash of the value, whatever the token."""

LEGACY_RANKER_CLIP = 10.0
"""The clip of ranker ``Standardize`` configs saved before this module (they carry no ``clip``)."""


def clean_vocabulary(values: Sequence[str], missing_value: str) -> list[str]:
    """The vocabulary as ``StringLookup`` accepts it, in file order: no duplicates, no ``""``
    (read as missing before the lookup), no :data:`OOV_TOKEN`; an empty list (no value reached
    ``min_count``) becomes ``[missing_value]`` so every other value lands in OOV."""
    seen: set[str] = set()
    kept: list[str] = []
    for value in values:
        if value and value != OOV_TOKEN and value not in seen:
            seen.add(value)
            kept.append(value)
    return kept or [missing_value]


@keras.saving.register_keras_serializable(package="deepclick")
class Lookup(keras.layers.StringLookup):
    """String → vocabulary index, ``""`` read as ``missing_value`` first (see module docstring)."""

    def __init__(self, missing_value: str, **kwargs: Any) -> None:
        kwargs.setdefault("oov_token", OOV_TOKEN)
        kwargs.setdefault("mask_token", None)
        super().__init__(**kwargs)
        self.missing_value = missing_value

    def call(self, inputs: Any) -> Any:
        values = tf.convert_to_tensor(inputs, dtype=tf.string)
        values = tf.where(tf.equal(values, ""), self.missing_value, values)
        return super().call(values)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "missing_value": self.missing_value}


def categorical_lookup(spec: FeatureSpec, feature: Feature, name: str | None = None) -> Lookup:
    """The lookup of one categorical feature, from its vocabulary file and ``oov_buckets``."""
    missing = str(feature.default or spec.missing_value)
    return Lookup(
        missing_value=missing,
        vocabulary=clean_vocabulary(spec.vocabulary(feature.name), missing),
        num_oov_indices=max(1, int(feature.oov_buckets or 1)),
        name=name or f"lookup__{feature.name}",
    )


@keras.saving.register_keras_serializable(package="deepclick")
class Standardize(keras.layers.Layer):
    """Stack numeric inputs into ``[batch, k]`` and standardise each column with fixed statistics
    (:meth:`NumericStats.standardize` is the numpy twin). A single tensor is one column.

    NaN (a value the caller could not fill) becomes the column's default before the transform, so a
    missing value standardises to the same number it did in training.
    """

    def __init__(
        self, stats: Sequence[dict[str, Any]], clip: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.stats = [dict(s) for s in stats]
        self.clip = float(CLIP_STD if clip is None else clip)
        self._mean = np.array([s["mean"] for s in self.stats], dtype=np.float32)
        self._scale = np.array(
            [standard_scale(s["std"], s["mean"]) for s in self.stats], dtype=np.float32
        )
        self._log = np.array([bool(s["log1p"]) for s in self.stats])
        self._default = np.array([s["default"] for s in self.stats], dtype=np.float32)

    def call(self, inputs: Any) -> Any:
        columns = inputs if isinstance(inputs, list | tuple) else [inputs]
        x = ops.stack([ops.reshape(ops.cast(v, "float32"), (-1,)) for v in columns], axis=-1)
        x = ops.where(ops.isnan(x), self._default, x)
        logged = ops.log1p(ops.maximum(x, 0.0))
        x = ops.where(self._log, logged, x)
        return ops.clip((x - self._mean) * self._scale, -self.clip, self.clip)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        nested = input_shape and isinstance(input_shape[0], list | tuple)
        first = input_shape[0] if nested else input_shape
        return (first[0], len(self.stats))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "stats": self.stats, "clip": self.clip}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Standardize:
        return cls(**{"clip": LEGACY_RANKER_CLIP, **config})


def numeric_standardize(stats: Sequence[NumericStats], name: str) -> Standardize:
    """The standardisation of these numeric inputs, in this order (one output column each)."""
    return Standardize([s.to_json() for s in stats], name=name)
