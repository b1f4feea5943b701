"""Small Keras layers the ranker is composed of (STYLE.md: "models as small composable pieces").

- :class:`Cross` — one DCN-v2 cross layer (Wang et al. 2021): explicit, bounded-degree feature
  crosses, which is what lets a ranker learn "this user segment likes this ad category" without a
  hand-made cross feature.
- :class:`FactorizationMachine` and :class:`NumericEmbedding` — DeepFM's pairwise interaction
  term and its numeric fields, kept to compare against (``architecture: deepfm``).
- :func:`mlp` — the deep tower both architectures share.
- :class:`CalibrationHead` — logit → calibrated probability, with the negative-sampling correction;
  it is part of the exported model so every consumer (TF Serving, the in-process predictor, the
  evaluation) reads the same calibrated ``pctr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

PROBABILITY_EPS = 1e-6
"""Calibrated probabilities are kept within [eps, 1 - eps] so logloss stays finite."""


@keras.saving.register_keras_serializable(package="deepclick")
class Cross(keras.layers.Layer):
    """``x_{l+1} = x_0 ⊙ (W x_l + b) + x_l``: each layer raises the degree of the crosses by one.

    With ``low_rank > 0`` the ``d × d`` matrix ``W`` is factored as ``U Vᵀ`` (rank ``low_rank``),
    the DCN-v2 "mixture-free low-rank" variant: fewer parameters when the input is wide.
    """

    def __init__(self, low_rank: int = 0, l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low_rank = int(low_rank)
        self.l2 = float(l2)

    def build(self, input_shape: Sequence[tuple[int | None, ...]]) -> None:
        dim = int(input_shape[0][-1])
        regularizer = keras.regularizers.L2(self.l2) if self.l2 else None
        if self.low_rank:
            self._down = keras.layers.Dense(
                self.low_rank, use_bias=False, kernel_regularizer=regularizer, name="down"
            )
            self._down.build((None, dim))
            self._up = keras.layers.Dense(dim, kernel_regularizer=regularizer, name="up")
            self._up.build((None, self.low_rank))
        else:
            self._dense = keras.layers.Dense(
                dim,
                kernel_initializer="glorot_uniform",
                kernel_regularizer=regularizer,
                name="dense",
            )
            self._dense.build((None, dim))

    def call(self, inputs: Sequence[Any]) -> Any:
        x0, x = inputs
        projected = self._up(self._down(x)) if self.low_rank else self._dense(x)
        return x0 * projected + x

    def compute_output_shape(self, input_shape: Sequence[tuple[int | None, ...]]) -> tuple:
        return tuple(input_shape[1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low_rank": self.low_rank, "l2": self.l2}


@keras.saving.register_keras_serializable(package="deepclick")
class FactorizationMachine(keras.layers.Layer):
    """DeepFM's second-order term over field embeddings ``[batch, fields, k]`` → ``[batch, 1]``:
    ``½ Σ_k ((Σ_f v_fk)² − Σ_f v_fk²)``, every pair of fields interacting through a dot product."""

    def call(self, fields: Any) -> Any:
        summed = ops.sum(fields, axis=1)
        pairwise = ops.square(summed) - ops.sum(ops.square(fields), axis=1)
        return 0.5 * ops.sum(pairwise, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple:
        return (input_shape[0], 1)


@keras.saving.register_keras_serializable(package="deepclick")
class NumericEmbedding(keras.layers.Layer):
    """Numeric columns ``[batch, m]`` as fields ``[batch, m, k]``: column j scales a learned vector
    ``v_j``, the FM way of letting a number interact with categorical embeddings."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = int(dim)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.vectors = self.add_weight(
            shape=(int(input_shape[-1]), self.dim), initializer="glorot_uniform", name="vectors"
        )

    def call(self, values: Any) -> Any:
        return ops.expand_dims(values, -1) * self.vectors

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple:
        return (*input_shape, self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim}


def mlp(
    units: Sequence[int], dropout: float = 0.0, l2: float = 0.0, name: str = "deep"
) -> keras.Sequential:
    """The deep tower: ReLU layers, optional dropout (training only)."""
    regularizer = keras.regularizers.L2(l2) if l2 else None
    layers: list[keras.layers.Layer] = []
    for i, width in enumerate(units):
        layers.append(
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=regularizer, name=f"{name}_{i}"
            )
        )
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"{name}_dropout_{i}"))
    return keras.Sequential(layers, name=name)


@keras.saving.register_keras_serializable(package="deepclick")
class CalibrationHead(keras.layers.Layer):
    """Raw logit → calibrated click probability, with no trainable weights.

    First ``logit + correction``: a model trained on negatives kept at rate ``r`` over-states the
    odds by ``1/r``, and ``correction = log(r)`` undoes it exactly. Then one of:

    - ``platt``: ``sigmoid(slope · z + intercept)``, two numbers fitted on held-out rows;
    - ``isotonic``: a monotone piecewise-linear map from ``z`` to a probability through fitted
      knots (flat beyond the end knots);
    - ``none``: ``sigmoid(z)``.
    """

    def __init__(
        self,
        method: str = "none",
        correction: float = 0.0,
        slope: float = 1.0,
        intercept: float = 0.0,
        knots_x: Sequence[float] = (),
        knots_y: Sequence[float] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in ("platt", "isotonic", "none"):
            raise ValueError(f"calibration method {method!r}: use platt, isotonic or none")
        if method == "isotonic" and (len(knots_x) < 1 or len(knots_x) != len(knots_y)):
            raise ValueError("isotonic calibration needs knots_x and knots_y of one length ≥ 1")
        self.method = method
        self.correction = float(correction)
        self.slope = float(slope)
        self.intercept = float(intercept)
        self.knots_x = [float(v) for v in knots_x]
        self.knots_y = [float(v) for v in knots_y]

    def call(self, logit: Any) -> Any:
        z = ops.cast(logit, "float32") + self.correction
        if self.method == "platt":
            p = ops.sigmoid(self.slope * z + self.intercept)
        elif self.method == "isotonic":
            p = self._interpolate(z)
        else:
            p = ops.sigmoid(z)
        return ops.clip(p, PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)

    def _interpolate(self, z: Any) -> Any:
        xs = np.asarray(self.knots_x, dtype=np.float32)
        ys = np.asarray(self.knots_y, dtype=np.float32)
        if xs.size == 1:
            return ops.zeros_like(z) + ys[0]
        right = ops.clip(ops.searchsorted(xs, z, side="right"), 1, xs.size - 1)
        left = right - 1
        x0, x1 = ops.take(xs, left), ops.take(xs, right)
        y0, y1 = ops.take(ys, left), ops.take(ys, right)
        t = ops.clip((z - x0) / ops.maximum(x1 - x0, 1e-12), 0.0, 1.0)
        return y0 + t * (y1 - y0)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "method": self.method,
            "correction": self.correction,
            "slope": self.slope,
            "intercept": self.intercept,
            "knots_x": self.knots_x,
            "knots_y": self.knots_y,
        }
