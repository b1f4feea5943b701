"""The ranker's raw inputs and how they reach the shared preprocessing, kept inside the model.

DESIGN.md asks for one feature spec read by both sides: the exported SavedModel therefore takes raw
values (strings for categorical features, floats for numeric ones) and does its own vocabulary
lookups and standardisation, so serving never re-implements a transform and can never drift from
training. The lookup and the standardisation are :mod:`models.preprocessing`, shared with the
towers (re-exported here under the names the ranker's model uses); this module groups the ranker's
inputs for them; :mod:`models.ranker.inputs` says which inputs exist and turns rows into them.

Similarity inputs (two-tower scores user·ad and context·ad) are extra numeric inputs whose
statistics come from the training rows rather than from the spec, because the spec describes the
features stage and the scores come later, from the embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras

from models.feature_spec import FeatureSpec, NumericStats
from models.ranker.inputs import SIMILARITY_INPUTS, input_dtypes

__all__ = [
    "Inputs",
    "NumericStats",
    "model_inputs",
    "numeric_stats",
]


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
