"""Preprocessing of the ranker, built from the feature spec alone and kept inside the model.

DESIGN.md asks for one feature spec read by both sides: the exported SavedModel therefore takes raw
values (strings for categorical features, floats for numeric ones) and does its own vocabulary
lookups and standardisation, so serving never re-implements a transform and can never drift from
training. This module holds those Keras pieces; :mod:`models.ranker.inputs` says which inputs exist
and turns rows into them.

Similarity inputs (two-tower scores user·ad and context·ad) are extra numeric inputs whose
statistics come from the training rows rather than from the spec, because the spec describes the
features stage and the scores come later, from the embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from models.feature_spec import Feature, FeatureSpec, standard_scale
from models.ranker.inputs import SIMILARITY_INPUTS, NumericStats, input_dtypes

OOV_TOKEN = "__deepclick_oov__"
"""StringLookup's name for out-of-vocabulary values (it must not be a vocabulary entry)."""

NUMERIC_CLIP = 10.0
"""Standardised numeric values are clipped to ±this: an unseen extreme (a new heavy advertiser's
impression count) must not push the network far outside what it was trained on."""


@keras.saving.register_keras_serializable(package="deepclick")
class Standardize(keras.layers.Layer):
    """Stack numeric inputs into ``[batch, k]`` and standardise each column with fixed statistics.

    NaN (a value the caller could not fill) becomes the column's default before the transform, so a
    missing value standardises to the same number it did in training.
    """

    def __init__(self, stats: Sequence[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats = [dict(s) for s in stats]
        self._mean = np.array([s["mean"] for s in self.stats], dtype=np.float32)
        self._scale = np.array(
            [standard_scale(s["std"], s["mean"]) for s in self.stats], dtype=np.float32
        )
        self._log = np.array([bool(s["log1p"]) for s in self.stats])
        self._default = np.array([s["default"] for s in self.stats], dtype=np.float32)

    def call(self, inputs: Sequence[Any]) -> Any:
        x = ops.stack([ops.cast(v, "float32") for v in inputs], axis=-1)
        x = ops.where(ops.isnan(x), self._default, x)
        logged = ops.log1p(ops.maximum(x, 0.0))
        x = ops.where(self._log, logged, x)
        return ops.clip((x - self._mean) * self._scale, -NUMERIC_CLIP, NUMERIC_CLIP)

    def compute_output_shape(self, input_shape: Sequence[tuple[int | None, ...]]) -> tuple:
        return (*input_shape[0], len(self.stats))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "stats": self.stats}


def string_lookup(spec: FeatureSpec, feature: Feature) -> keras.layers.StringLookup:
    """A vocabulary lookup for one categorical feature: ids ``0..oov-1`` are the OOV buckets (values
    hashed among them), then the vocabulary in file order. An empty vocabulary (no value reached
    ``min_count``) gets the missing marker as its only entry, so everything else lands in OOV."""
    vocabulary = spec.vocabulary(feature.name) or [spec.missing_value]
    return keras.layers.StringLookup(
        vocabulary=vocabulary,
        num_oov_indices=max(1, int(feature.oov_buckets or 1)),
        mask_token=None,
        oov_token=OOV_TOKEN,
        name=f"lookup__{feature.name}",
    )


@dataclass
class Inputs:
    """The symbolic raw inputs of a ranker, grouped as the layers downstream need them."""

    raw: dict[str, Any]
    categorical: dict[str, Any]
    numeric: dict[str, Any]
    similarity: dict[str, Any]


def model_inputs(spec: FeatureSpec, similarity: bool) -> Inputs:
    """One scalar-per-row Keras input per spec feature (``string`` or ``float32``), plus the two
    similarity inputs when the model uses them. Names equal the feature names, which become the
    names of the exported signatures' inputs."""
    raw = {
        name: keras.Input(shape=(), dtype=dtype, name=name)
        for name, dtype in input_dtypes(spec, similarity).items()
    }
    categorical = {f.name: raw[f.name] for f in spec.categorical}
    numeric = {f.name: raw[f.name] for f in spec.numeric}
    sims = {n: raw[n] for n in SIMILARITY_INPUTS if n in raw}
    return Inputs(raw, categorical, numeric, sims)


def numeric_stats(spec: FeatureSpec, similarity: Mapping[str, NumericStats]) -> list[NumericStats]:
    """The standardisation of every numeric input: spec features, then the similarity scores."""
    return [NumericStats.of(f) for f in spec.numeric] + [
        similarity[n] for n in SIMILARITY_INPUTS if n in similarity
    ]
