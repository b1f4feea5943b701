"""The window FM blended into the ranker (``ranker.fm_blend``, issue 10).

The ranker's network learns from the window's last days (the towers' scores forbid the earlier
ones), while the slates need each ad's own quality and the user × ad match learnt from the whole
window. A structured factorization machine fitted on every training day does that:

- a weight per categorical value plus a rank-``fm_dim`` product of the query's summed vectors
  (the user and context features, ``SHARED_ROLES``) and the ad's summed vectors;
- the user's own id and the day of the week stay out (a vector per user from a handful of rows,
  and a weekday vector fitted on one day, both measured to hurt: docs/history/model-quality.md,
  session 16); the hour of the day keeps a weight of its own and no vector;
- then one random effect per ad, fitted with the FM's logit as offset
  (:func:`models.ranker.wide.random_effects`, prior ``fm_ad_effect_variance``), added to the ad
  id's weight; with ``fm_ad_vector_variance`` (off: it lost the demo slate, session 23) also a
  correction to the ad id's vector, as random slopes on the query's vector
  (:func:`models.ranker.wide.random_slopes`).

The network is trained as before, on its own logit, and its calibration head is fitted on the
held-out rows as before. The FM is fitted on every training day's rows and the held-out rows
(the freshest day: without it the demo's FM falls from 0.50 to 0.37 of the oracle) and frozen.
The exported probability mixes the two in logit space, ``(1 - w) * logit(calibrated ranker) +
w * fm`` (:class:`CalibratedBlend`), shifted so that it predicts as many held-out clicks as the
calibrated network (:func:`blend_level`); the raw logit model ends in :class:`Blend` of the
two raw logits. Why a blend and not the FM alone: measured on the same rows and requests, the
FM alone loses AUC at every scale and the demo slate, the blend wins both at demo and medium
scale (docs/history/model-quality.md, session 17).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops
from scipy.optimize import brentq

from deepclick.settings import RankerSettings
from models.feature_spec import ROLE_KEY, FeatureSpec
from models.ranker.inputs import SHARED_ROLES
from models.ranker.layers import PROBABILITY_EPS

FM_PREFIX = "fm__"
"""Layer names of the FM's per-feature tables: ``fm__<feature>``."""
FM_LOGIT = "fm_logit"
RANKER_LOGIT = "ranker_logit"
"""The network's (and wide part's) own logit, before the blend: what the network trains on."""
BLEND = "fm_blend"
CALIBRATED_BLEND = "fm_calibrated_blend"
HOUR = "ctx__hour"
LEFT_OUT = (ROLE_KEY["user"], "ctx__dow")
"""Categorical features the FM leaves out (see the module doc)."""


@dataclass(frozen=True)
class FMSides:
    """Which categorical features the FM reads, and how."""

    query: list[str]
    """user and context features: their vectors are summed into the query's."""
    ad: list[str]
    """ad features (the ad's id among them): summed into the ad's vector."""
    first_order: list[str]
    """features with a weight and no vector (the hour)."""

    @property
    def roles(self) -> dict[str, str]:
        """Feature → ``query``, ``ad`` or ``first``."""
        return {
            **dict.fromkeys(self.query, "query"),
            **dict.fromkeys(self.ad, "ad"),
            **dict.fromkeys(self.first_order, "first"),
        }


def uses_fm(settings: RankerSettings) -> bool:
    """The ranker blends the window FM in: ``fm_blend`` > 0 on the served architecture (a
    DeepFM ranker, kept to compare against, ignores it)."""
    return settings.fm_blend > 0 and settings.architecture == "dcn_v2"


def fm_sides(spec: FeatureSpec) -> FMSides:
    """The FM's sides from the spec's categorical features, in the spec's order."""
    taking_part = [f for f in spec.categorical if f.name not in (*LEFT_OUT, HOUR)]
    return FMSides(
        query=[f.name for f in taking_part if f.role in SHARED_ROLES],
        ad=[f.name for f in taking_part if f.role not in SHARED_ROLES],
        first_order=[f.name for f in spec.categorical if f.name == HOUR],
    )


@keras.saving.register_keras_serializable(package="deepclick")
class FMLogit(keras.layers.Layer):
    """``bias + Σ weights + (Σ query vectors) · (Σ ad vectors)``.

    Inputs: one tensor per feature, ``[batch, 1 + dim]`` (weight, then vector) for a ``query``
    or ``ad`` feature, ``[batch, 1]`` for a ``first`` one, in the order of ``roles``.
    """

    def __init__(
        self,
        roles: Sequence[str],
        bias: float = 0.0,
        features: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.roles = list(roles)
        self.bias_init = float(bias)
        self.features = list(features)
        """The feature of each input, in order (what :func:`fm_trainer` feeds)."""

    def build(self, input_shape: Any) -> None:
        self.bias = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.bias_init), name="bias"
        )

    def call(self, inputs: Sequence[Any]) -> Any:
        first = ops.sum(ops.stack([t[:, 0] for t in inputs], axis=1), axis=1)
        query = [t[:, 1:] for t, r in zip(inputs, self.roles, strict=True) if r == "query"]
        ad = [t[:, 1:] for t, r in zip(inputs, self.roles, strict=True) if r == "ad"]
        out = self.bias + first
        if query and ad:
            out = out + ops.sum(sum(query[1:], query[0]) * sum(ad[1:], ad[0]), axis=1)
        return out

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "roles": self.roles,
            "bias": self.bias_init,
            "features": self.features,
        }


@keras.saving.register_keras_serializable(package="deepclick")
class Blend(keras.layers.Layer):
    """``(1 - weight) * ranker + weight * fm + level``: the two raw logits mixed. ``level`` is
    a (frozen) weight, so that a model rebuilt from another's weights keeps it: the shift that
    gives the calibrated blend the held-out rows' click count (:func:`blend_level`)."""

    def __init__(self, weight: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight = float(weight)

    def build(self, input_shape: Any) -> None:
        self.level = self.add_weight(shape=(), initializer="zeros", trainable=False, name="level")

    def call(self, inputs: Sequence[Any]) -> Any:
        ranker, fm = inputs
        return (1.0 - self.weight) * ranker + self.weight * fm + self.level

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "weight": self.weight}


@keras.saving.register_keras_serializable(package="deepclick")
class CalibratedBlend(keras.layers.Layer):
    """The exported probability: ``sigmoid((1 - weight) * logit(p) + weight * (fm +
    correction))``, ``p`` the ranker's calibrated probability and ``fm`` the FM's logit, shifted
    by the negative sampling's ``correction`` as the calibration head shifts the ranker's. The
    FM is fitted on the held-out rows too, so it brings its own calibration; the head stays
    fitted on rows the network never saw."""

    def __init__(
        self, weight: float, correction: float = 0.0, intercept: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.weight = float(weight)
        self.correction = float(correction)
        self.intercept = float(intercept)

    def call(self, inputs: Sequence[Any]) -> Any:
        p, fm = inputs
        p = ops.clip(ops.cast(p, "float32"), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
        z = (1.0 - self.weight) * ops.log(p / (1.0 - p)) + self.weight * (
            ops.cast(fm, "float32") + self.correction
        )
        return ops.clip(ops.sigmoid(z + self.intercept), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "weight": self.weight,
            "correction": self.correction,
            "intercept": self.intercept,
        }


def blend_level(
    ranker_p: np.ndarray, fm: np.ndarray, clicks: float, weight: float, correction: float
) -> float:
    """The intercept that makes the calibrated blend predict ``clicks`` on the held-out rows:
    the clicks the calibrated network itself predicts there (``ranker_p.sum()``).

    Why: each part is calibrated (the network by its head on these rows, the FM by its own fit),
    but a mix of logits is not: on the demo's held-out day the blend predicted 0.977 of the
    clicks. The target is the network's own prediction, not the observed count, so that the
    head's judgement of how far the held-out clicks can be trusted stands: on the demo's
    2024-01-03 (64 held-out clicks, the head not applied) a level fitted to the observed count
    moved D's calibration from 0.976 to 1.133 and the gate refused the day."""
    p = np.clip(np.asarray(ranker_p, dtype=np.float64), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    z = (1 - weight) * np.log(p / (1 - p)) + weight * (np.asarray(fm, np.float64) + correction)

    def excess(level: float) -> float:
        return float(np.sum(1 / (1 + np.exp(-(z + level))))) - clicks

    return float(brentq(excess, -10.0, 10.0, xtol=1e-8))


def fm_logit(
    spec: FeatureSpec,
    indices: dict[str, tuple[Any, int]],
    dim: int,
    l2: float,
    bias: float,
) -> Any:
    """The FM's logit tensor over the ranker's own vocabulary ``indices`` (feature → (index
    tensor, vocabulary size)); one ``fm__<feature>`` table per feature it reads."""
    sides = fm_sides(spec)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    tensors, roles, features = [], [], []
    for name, role in sides.roles.items():
        index, size = indices[name]
        width = 1 if role == "first" else dim + 1
        table = keras.layers.Embedding(
            size, width, embeddings_regularizer=regularizer, name=f"{FM_PREFIX}{name}"
        )
        tensors.append(table(index))
        roles.append(role)
        features.append(name)
    return FMLogit(roles, bias=bias, features=features, name=FM_LOGIT)(tensors)


def fm_trainer(logit_model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """The FM of ``logit_model`` on integer inputs, for its fit: (``lookups``, raw inputs → each
    FM feature's vocabulary index; ``trainer``, those indices → the FM's logit). Both share the
    ranker's own layers (lookups, tables, :class:`FMLogit`), so training ``trainer`` trains the
    ranker's FM. Why: the string lookups then run once per row instead of once per epoch
    (medium: the ranker stage took 477 s with the FM fitted on strings, 207 s without it)."""
    fm = logit_model.get_layer(FM_LOGIT)
    tables = fm_tables(logit_model)
    lookups = keras.Model(
        logit_model.input,
        {name: logit_model.get_layer(f"lookup__{name}").output for name in fm.features},
        name="window_fm_lookups",
    )
    codes = {name: keras.Input(shape=(), dtype="int64", name=name) for name in fm.features}
    trainer = keras.Model(
        codes, fm([tables[name](codes[name]) for name in fm.features]), name="window_fm"
    )
    return lookups, trainer


def fm_tables(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Feature → its FM table in ``model`` ({} without an FM)."""
    return {
        layer.name[len(FM_PREFIX) :]: layer
        for layer in model.layers
        if layer.name.startswith(FM_PREFIX)
    }


def has_fm(model: keras.Model) -> bool:
    """``model`` (the raw logit model or the calibrated one) holds the window FM."""
    return any(layer.name == FM_LOGIT for layer in model.layers)
