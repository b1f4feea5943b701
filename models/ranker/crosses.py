"""Explicit feature crosses for the ranker's wide part: one weight per (value of A, value of B).

Why: the generated world's match term is a user's (and placement's) profile times an ad's category
and brand (``pipelines.simulate.world``). A logistic regression offered exactly those crosses beat
the ranker on the demo's D, and on every training day reached 1.10x the most-clicked ads where the
ranker reached 1.03x; the DCN's cross layers, fitted on ~1k clicks, did not find them (issue 10,
docs/history/model-quality.md). So ``ranker.crosses`` names feature pairs, and each becomes one
more table of the first-order (wide) part, solved with it as an L2 logistic regression
(:mod:`models.ranker.wide`).

The cross is computed on the vocabulary indices the model has already looked up, as integers:
``cell = index_a * |V_b| + index_b`` into a table of ``|V_a| * |V_b|`` weights, or, when that
product exceeds ``ranker.cross_buckets``, the same number mixed and taken modulo the bucket count
(a hashed cross). No string op is added, so the serving graph
(:mod:`models.ranker.serving_graph`) and its ``indexed`` signature compute the same cells from the
table rows they already hold (:func:`cross_cell` is the one definition both use).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from models.feature_spec import FeatureSpec

log = logging.getLogger(__name__)

CROSS_INDEX_PREFIX = "cross_index__"
WIDE_CROSS_PREFIX = "wide_cross__"
SEPARATOR = "*"
HASH_MULTIPLIER = 2_654_435_761
"""Knuth's multiplicative constant: spreads ``index_a * |V_b| + index_b`` over the buckets of a
hashed cross, so neighbouring cells do not collide in runs."""


@dataclass(frozen=True)
class CrossPair:
    """Two categorical features of the spec whose values are crossed."""

    left: str
    right: str

    @property
    def name(self) -> str:
        return f"{self.left}{SEPARATOR}{self.right}"


def _feature_named(spec: FeatureSpec, side: str) -> str | None:
    """The spec's categorical feature ``side`` names: its exact name, or the one feature whose
    field (the part after the last ``__``) it is, so one setting serves every dataset spec that
    has that field."""
    categorical = [f.name for f in spec.categorical]
    if side in categorical:
        return side
    numeric = {f.name for f in spec.numeric}
    matches = [n for n in categorical if n.rsplit("__", 1)[-1] == side]
    if len(matches) > 1:
        raise ValueError(
            f"ranker.crosses: {side!r} is the field of several features ({', '.join(matches)}); "
            "name one of them in full"
        )
    if not matches and (side in numeric or any(n.rsplit("__", 1)[-1] == side for n in numeric)):
        raise ValueError(
            f"ranker.crosses: {side!r} is a numeric feature; crosses pair categorical features"
        )
    return matches[0] if matches else None


def resolve_crosses(spec: FeatureSpec, entries: Sequence[str]) -> list[CrossPair]:
    """The pairs of ``entries`` (``"a*b"``, each side a feature name or a field name) that the
    spec has. A pair with a side the spec lacks is skipped and logged: the default names the
    generated marketplace's fields, and a real log's spec need not have them.

    Raises:
        ValueError: an entry is not ``a*b``, a side is numeric or ambiguous, or pairs a feature
            with itself.
    """
    pairs: list[CrossPair] = []
    skipped: list[str] = []
    for entry in entries:
        sides = [s.strip() for s in entry.split(SEPARATOR)]
        if len(sides) != 2 or not all(sides):
            raise ValueError(
                f"ranker.crosses entry {entry!r}: write two categorical features as 'a*b'"
            )
        left, right = (_feature_named(spec, s) for s in sides)
        if left is None or right is None:
            skipped.append(entry)
            continue
        if left == right:
            raise ValueError(f"ranker.crosses entry {entry!r} crosses {left} with itself")
        pair = CrossPair(left, right)
        if pair not in pairs:
            pairs.append(pair)
    if skipped:
        log.info("ranker crosses not in feature spec %s, skipped: %s", spec.version, skipped)
    return pairs


def cross_size(left_size: int, right_size: int, buckets: int) -> int:
    """Rows of a cross's weight table: every cell, or ``buckets`` when there are more cells."""
    return min(left_size * right_size, buckets)


def cross_cell(left: Any, right: Any, right_size: int, size: int, hashed: bool) -> Any:
    """The table row of each (left, right) pair of vocabulary indices (integer tensors of one
    shape): ``left * right_size + right``, mixed modulo ``size`` when ``hashed``."""
    cell = ops.cast(left, "int64") * right_size + ops.cast(right, "int64")
    if hashed:
        cell = ops.mod(cell * HASH_MULTIPLIER, size)
    return cell


@keras.saving.register_keras_serializable(package="deepclick")
class CrossIndex(keras.layers.Layer):
    """``[left_index, right_index]`` → the cross's table row (:func:`cross_cell`); no weights.
    Its config names the two features, which is how the serving graph finds them again."""

    def __init__(
        self,
        left: str,
        right: str,
        left_size: int,
        right_size: int,
        buckets: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.left, self.right = str(left), str(right)
        self.left_size, self.right_size = int(left_size), int(right_size)
        self.buckets = int(buckets)
        self.size = cross_size(self.left_size, self.right_size, self.buckets)
        self.hashed = self.left_size * self.right_size > self.buckets

    def call(self, inputs: Sequence[Any]) -> Any:
        left, right = inputs
        return cross_cell(left, right, self.right_size, self.size, self.hashed)

    def compute_output_shape(self, input_shape: Sequence[tuple[int | None, ...]]) -> tuple:
        return tuple(input_shape[0])

    def compute_output_spec(self, inputs: Sequence[Any]) -> Any:
        return keras.KerasTensor(inputs[0].shape, dtype="int64")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "left": self.left,
            "right": self.right,
            "left_size": self.left_size,
            "right_size": self.right_size,
            "buckets": self.buckets,
        }
