"""What the ranker's inputs are and how rows become them — numpy and pandas only.

The exported model takes raw values, one tensor per feature (named as in the feature spec), plus the
two two-tower scores when it was trained with them. This module is the one place that knows those
names, their dtypes, which of them the ``rank`` signature takes once per request (user and context)
and which once per candidate (ad features and scores), and how a table of the features folder (or a
request) becomes an input dict. It imports no TensorFlow, so serving and the predictor can use it
without loading Keras.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from models.feature_spec import MISSING, ROLE_KEY, FeatureSpec, NumericStats
from models.raw_values import text_values

SIMILARITY_INPUTS: tuple[str, str] = ("sim_user_ad", "sim_context_ad")
CANDIDATE_INDEX = "candidate_index"
"""Not a feature: a request may carry its candidates' rows of the fused ranker's candidate table
(``[N, k]`` int32, the ``indexed`` signature's input of that name) beside their strings, so the
in-process predictor does not look the strings up again (precomputed per ad at release load)."""
"""Input names of the two-tower scores: user·ad and context·ad (docs/contracts.md §4, ``dot``)."""

SHARED_ROLES: tuple[str, ...] = ("user", "context")
"""Roles whose features the ``rank`` signature takes once per request ([1] tensors)."""

Dtype = Literal["string", "float32"]


@runtime_checkable
class SimilarityProvider(Protocol):
    """Two-tower scores for (user, placement, ad) triples, the ranker's optional extra inputs.

    The lead backs this with a published embeddings version (``candidates.store``; see
    :class:`models.ranker.similarity.EmbeddingSimilarity`); the ranker only needs the two dot
    products, so any source of them (a stub in tests, a live store in serving) fits. ``version`` is
    the embeddings version, recorded in the exported model's manifest so that a release pairs the
    ranker with the vectors it was trained against.
    """

    @property
    def version(self) -> str: ...

    def scores(
        self, user_ids: np.ndarray, placement_ids: np.ndarray, ad_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(user·ad, context·ad)``, two float arrays as long as the inputs."""
        ...


def input_dtypes(spec: FeatureSpec, similarity: bool) -> dict[str, Dtype]:
    """Every raw input of the model in order (spec order, similarity scores last) with its dtype:
    ``string`` for categorical features, ``float32`` for numeric ones and the scores."""
    dtypes: dict[str, Dtype] = {
        f.name: "string" if f.kind == "categorical" else "float32" for f in spec.features
    }
    if similarity:
        dtypes.update(dict.fromkeys(SIMILARITY_INPUTS, "float32"))
    return dtypes


def shared_inputs(spec: FeatureSpec) -> list[str]:
    """Inputs the ``rank`` signature takes once per request: the user and context features."""
    return [f.name for f in spec.features if f.role in SHARED_ROLES]


def candidate_inputs(spec: FeatureSpec, similarity: bool) -> list[str]:
    """Inputs the ``rank`` signature takes once per candidate: ad features and the scores."""
    names = [f.name for f in spec.features if f.role not in SHARED_ROLES]
    return names + (list(SIMILARITY_INPUTS) if similarity else [])


def columns_to_inputs(
    frame: pd.DataFrame,
    dtypes: Mapping[str, Dtype],
    *,
    missing_value: str = MISSING,
    defaults: Mapping[str, float] | None = None,
    similarity: SimilarityProvider | None = None,
) -> dict[str, np.ndarray]:
    """An input dict from the columns of ``frame``.

    String inputs become object arrays of ``str`` (null or empty → ``missing_value``); float inputs
    float32 (null → ``defaults[name]``, or NaN, which the model itself maps to the default). With a
    ``similarity`` provider the two scores are computed from the id columns, otherwise they are read
    from ``frame``.

    Raises:
        KeyError: ``frame`` lacks a needed column; the message names every missing one.
    """
    computed = set(SIMILARITY_INPUTS) if similarity is not None else set()
    needed = [n for n in dtypes if n not in computed]
    if similarity is not None:
        needed += [ROLE_KEY[r] for r in ("user", "context", "ad") if ROLE_KEY[r] not in needed]
    missing = [n for n in needed if n not in frame.columns]
    if missing:
        raise KeyError(f"rows lack input column(s) {', '.join(missing)}")
    defaults = defaults or {}
    out: dict[str, np.ndarray] = {}
    for name, dtype in dtypes.items():
        if name in computed:
            continue
        column = frame[name]
        if dtype == "string":
            out[name] = text_values(column, missing_value)
        else:
            values = pd.to_numeric(column, errors="coerce")
            if name in defaults:
                values = values.fillna(defaults[name])
            out[name] = values.to_numpy(dtype=np.float32, na_value=np.nan)
    if similarity is not None and computed & set(dtypes):
        ids = [
            frame[ROLE_KEY[r]].astype(str).to_numpy(dtype=object) for r in ("user", "context", "ad")
        ]
        user_ad, context_ad = similarity.scores(*ids)
        out[SIMILARITY_INPUTS[0]] = np.asarray(user_ad, dtype=np.float32).reshape(-1)
        out[SIMILARITY_INPUTS[1]] = np.asarray(context_ad, dtype=np.float32).reshape(-1)
    return {name: out[name] for name in dtypes}


def frame_to_inputs(
    spec: FeatureSpec,
    frame: pd.DataFrame,
    *,
    similarity: SimilarityProvider | None = None,
) -> dict[str, np.ndarray]:
    """The model's raw input dict for the rows of a features-folder table: categorical values as
    strings (missing → the spec's marker), numeric values as float32 (missing → the feature's
    default), plus the two scores when a ``similarity`` provider is given."""
    defaults = {f.name: NumericStats.of(f).default for f in spec.numeric}
    return columns_to_inputs(
        frame,
        input_dtypes(spec, similarity is not None),
        missing_value=spec.missing_value,
        defaults=defaults,
        similarity=similarity,
    )


def rank_request(
    inputs: Mapping[str, np.ndarray], shared: Sequence[str], row: int = 0
) -> dict[str, np.ndarray]:
    """A ``rank`` request from a per-row input dict: the ``shared`` inputs of one ``row`` as
    length-1 arrays, every other input whole. Used to build warmup requests and to test that
    ``rank`` and ``serving_default`` agree."""
    return {
        name: values[row : row + 1] if name in shared else values for name, values in inputs.items()
    }
