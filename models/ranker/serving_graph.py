"""The exported ranker's serving graph: the trained weights re-arranged so that one request costs
a few dozen TensorFlow ops instead of hundreds (issue 14).

The trained Keras model (:func:`models.ranker.model.build_logit_model`) is written for training:
per categorical feature one embedding lookup and one wide (first-order) lookup, each a Keras
``take`` of about six ops, and every input row-aligned, so the ``rank`` signature had to broadcast
the user's and placement's features to all N candidates and look them up N times. At 500
candidates the arithmetic is about 1 ms of one core; the measured predict was 10 ms, nearly all
TensorFlow's per-op cost (``bench/serving``: 504 graph nodes per call, 26 gathers for 13 features).

:class:`ServingRanker` computes the same function from the same weights with fewer ops:

- each categorical feature's embedding row and wide weight are one row of one table
  (``dim + 1`` columns), and the features of a side share one table with per-feature row offsets:
  the user-and-context side is one gather, the candidate side one gather;
- the user and context features are looked up, gathered and standardised once per request (a
  ``[1]`` batch) and broadcast to the candidates afterwards, not before;
- the cross layers, the deep tower, the output layer and the calibration head are the trained
  layers themselves.

The ``packed`` signature (:func:`packed_groups`, :meth:`ServingRanker.call_packed`) takes the same
inputs as at most four tensors — the shared strings ``[B, S]`` and numbers ``[B, F]`` (``B`` = 1
for one request, or one row per candidate), the candidates' strings ``[N, C]`` and numbers
``[N, G]`` — and unstacks them into the same graph: the in-process predictor then converts four
arrays per call instead of ~26, each conversion costing TensorFlow's fixed ~45 µs.

The vocabulary lookups and the standardisation are the trained model's own layers
(:mod:`models.ranker.preprocessing`), so raw inputs mean exactly what they meant in training. Only
the order of the additions in the wide sum differs from the Keras model (a sum over the gathered
rows instead of a chain of ``Add``), which moves a probability by about 1e-7. The export checks
the reloaded model against the Keras model (:func:`models.ranker.export._check`), and
``tests/test_ranker_serving_graph.py`` holds the two to 1e-5.

DeepFM rankers are exported as the Keras model (no fused graph): they are kept to compare against,
not to serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from models.feature_spec import FeatureSpec
from models.preprocessing import Standardize
from models.ranker.crosses import WIDE_CROSS_PREFIX, CrossIndex, cross_cell
from models.ranker.fm import CALIBRATED_BLEND, FM_LOGIT, fm_sides, fm_tables, has_fm
from models.ranker.layers import CalibrationHead, Cross
from models.ranker.model import WIDE_NUMERIC, WIDE_PREFIX
from models.ranker.predictor import INDEX_SIGNATURES, packed_dtype

PACKED_GROUPS = ("shared_strings", "shared_numbers", "candidate_strings", "candidate_numbers")
"""The ``packed`` signature's inputs (:data:`models.ranker.predictor.PACKED`), in this order; a
group without features is left out."""


def packed_groups(rank_inputs: Mapping[str, tf.TensorSpec]) -> dict[str, list[str]]:
    """Which ``rank`` input is which column of which ``packed`` input: shared (``[1]`` in
    ``rank``) or per candidate, string or number; columns in name order; empty groups dropped.
    Recorded in the export manifest, which the predictor reads back (the one description)."""
    groups: dict[str, list[str]] = {g: [] for g in PACKED_GROUPS}
    for name in sorted(rank_inputs):
        spec = rank_inputs[name]
        side = "shared" if spec.shape.as_list() == [1] else "candidate"
        kind = "strings" if spec.dtype == tf.string else "numbers"
        groups[f"{side}_{kind}"].append(name)
    return {g: names for g, names in groups.items() if names}


def packed_specs(groups: Mapping[str, Sequence[str]]) -> dict[str, tf.TensorSpec]:
    """The ``packed`` signature's input specs: ``[None, columns]`` per group."""
    return {
        g: tf.TensorSpec([None, len(names)], packed_dtype(g), name=g) for g, names in groups.items()
    }


def _layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    names = {layer.name for layer in model.layers}
    return model.get_layer(name) if name in names else None


def can_fuse(model: keras.Model) -> bool:
    """True for a DCN-v2 ranker (with or without its wide part): the architecture this graph
    reproduces. DeepFM models are served as they are."""
    return _layer(model, "x0") is not None and _layer(model, "logit") is not None


class _Side:
    """One side of a request (shared: user and context; candidates: ads and scores): its
    categorical features as one fused table, its numbers as one standardisation."""

    def __init__(
        self,
        model: keras.Model,
        categorical: Sequence[str],
        stats: Sequence[dict[str, Any]],
        wide: bool,
        name: str,
        fm: _FMColumns | None = None,
    ) -> None:
        self.categorical = list(categorical)
        self.numeric = [s["name"] for s in stats]
        self.lookups = [model.get_layer(f"lookup__{f}") for f in self.categorical]
        blocks, offsets, start = [], [], 0
        for feature in self.categorical:
            table = np.asarray(model.get_layer(f"embedding__{feature}").get_weights()[0])
            if wide:
                weight = np.asarray(model.get_layer(f"{WIDE_PREFIX}{feature}").get_weights()[0])
                table = np.concatenate([table, weight.reshape(-1, 1)], axis=1)
            if fm is not None:
                table = np.concatenate([table, fm.columns(feature, table.shape[0])], axis=1)
            blocks.append(table.astype(np.float32))
            offsets.append(start)
            start += table.shape[0]
        self.values = np.concatenate(blocks) if blocks else None
        self.table: Any = None
        """The fused table as a weight of the owning layer (so the export tracks it)."""
        self.offsets = tf.constant(offsets, dtype=tf.int64)
        self.offset_of = dict(zip(self.categorical, offsets, strict=True))
        self.standardize = Standardize(list(stats), name=f"{name}_standardize") if stats else None

    def index(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """``[batch, features]`` int32: each categorical value's row of the fused table (its
        vocabulary index plus the feature's offset), features in :attr:`categorical` order. The
        only string work of the graph; the ``*_index`` signatures export it alone."""
        if self.table is None:
            return None
        index = tf.stack(
            [
                tf.cast(lookup(inputs[f]), tf.int64)
                for f, lookup in zip(self.categorical, self.lookups, strict=True)
            ],
            axis=1,
        )
        return tf.cast(index + self.offsets, tf.int32)

    def gather(self, index: tf.Tensor | None) -> tf.Tensor | None:
        """``[batch, features, dim (+1)]``: every feature's embedding (and wide weight) for the
        table rows of :meth:`index`."""
        if self.table is None or index is None:
            return None
        return tf.gather(self.table, index)

    def numbers(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """``[batch, numbers]`` standardised as in training."""
        if self.standardize is None:
            return None
        return self.standardize([inputs[n] for n in self.numeric])


class _FMColumns:
    """The window FM (:mod:`models.ranker.fm`) as ``1 + 2 * dim`` more columns of each fused
    table row: the value's weight, its vector in the query half or the ad half (zeros in the
    other), so that one gather serves the network, the wide part and the FM alike. A feature the
    FM does not read has zeros; the hour has its weight only."""

    def __init__(self, model: keras.Model, spec: FeatureSpec) -> None:
        self.tables = {name: np.asarray(t.get_weights()[0]) for name, t in fm_tables(model).items()}
        self.roles = fm_sides(spec).roles
        fm = model.get_layer(FM_LOGIT)
        self.bias = float(np.asarray(fm.bias))
        self.dim = max((t.shape[1] - 1 for t in self.tables.values()), default=0)
        self.blend = model.get_layer(CALIBRATED_BLEND)

    def columns(self, feature: str, rows: int) -> np.ndarray:
        out = np.zeros((rows, 1 + 2 * self.dim), dtype=np.float32)
        role = self.roles.get(feature)
        if role is None:
            return out
        table = self.tables[feature]
        out[:, 0] = table[:, 0]
        if role == "query":
            out[:, 1 : 1 + self.dim] = table[:, 1:]
        elif role == "ad":
            out[:, 1 + self.dim :] = table[:, 1:]
        return out

    def logit(self, rows: tf.Tensor, first: int) -> tf.Tensor:
        """The FM's logit ``[N]`` from the gathered rows ``[N, features, columns]``, its
        columns starting at ``first``."""
        k = self.dim
        summed = tf.reduce_sum(rows[:, :, first : first + 1 + 2 * k], axis=1)
        match = tf.reduce_sum(summed[:, 1 : 1 + k] * summed[:, 1 + k :], axis=1)
        return self.bias + summed[:, 0] + match


class ServingRanker(keras.layers.Layer):
    """Raw inputs → calibrated ``pctr`` with the weights of a trained DCN-v2 ranker, shared
    (user and context) inputs ``[1]`` or ``[N]``, candidate inputs ``[N]``; see the module doc.

    Args:
        model: the trained, calibrated Keras ranker (``TrainedRanker.model``).
        spec: its feature spec (which features are categorical, their order in ``x0``).
        shared: the inputs sent once per request (:func:`models.ranker.inputs.shared_inputs`).

    Raises:
        ValueError: ``model`` is not a DCN-v2 ranker (:func:`can_fuse`).
    """

    def __init__(
        self, model: keras.Model, spec: FeatureSpec, shared: Sequence[str], **kwargs: Any
    ) -> None:
        super().__init__(name=kwargs.pop("name", "serving_ranker"), **kwargs)
        if not can_fuse(model):
            raise ValueError(f"model {model.name!r} is not a DCN-v2 ranker; export it as it is")
        shared_set = set(shared)
        self.wide = _layer(model, f"{WIDE_PREFIX}{spec.categorical[0].name}") is not None
        standardize = _layer(model, "standardize")
        stats = list(standardize.stats) if standardize is not None else []
        order = [f.name for f in spec.categorical]
        self.categorical_order = order
        self.numeric_order = [s["name"] for s in stats]
        self.fm = _FMColumns(model, spec) if has_fm(model) else None
        self.shared_side = _Side(
            model,
            [f for f in order if f in shared_set],
            [s for s in stats if s["name"] in shared_set],
            self.wide,
            "shared",
            self.fm,
        )
        self.candidate_side = _Side(
            model,
            [f for f in order if f not in shared_set],
            [s for s in stats if s["name"] not in shared_set],
            self.wide,
            "candidate",
            self.fm,
        )
        for side in (self.shared_side, self.candidate_side):
            if side.values is not None:
                side.table = self.add_weight(
                    shape=side.values.shape,
                    initializer="zeros",
                    trainable=False,
                    name=f"{'shared' if side is self.shared_side else 'candidate'}_table",
                )
                side.table.assign(side.values)
        # the vocabulary lookups as attributes of this layer, so an export tracks their tables
        self.lookups = [*self.shared_side.lookups, *self.candidate_side.lookups]
        grouped_cat = self.shared_side.categorical + self.candidate_side.categorical
        grouped_num = self.shared_side.numeric + self.candidate_side.numeric
        self.cat_perm = _permutation(grouped_cat, order)
        self.num_perm = _permutation(grouped_num, self.numeric_order)
        self.dim = int(model.get_layer(f"embedding__{order[0]}").output_dim)
        self.first_input = (self.candidate_side.categorical + self.candidate_side.numeric)[0]
        self.crosses = sorted(
            (layer for layer in model.layers if isinstance(layer, Cross)), key=lambda la: la.name
        )
        self.deep = model.get_layer("deep")
        self.logit = model.get_layer("logit")
        heads = [layer for layer in model.layers if isinstance(layer, CalibrationHead)]
        self.head = heads[0] if heads else None
        wide_numeric = _layer(model, WIDE_NUMERIC) if self.wide else None
        self.numeric_kernel = (
            tf.constant(np.asarray(wide_numeric.get_weights()[0], dtype=np.float32))
            if wide_numeric is not None
            else None
        )
        self.wide_crosses = _WideCrosses(model, order, self.shared_side, self.candidate_side)
        if self.wide_crosses.values is not None:
            self.wide_crosses.table = self.add_weight(
                shape=self.wide_crosses.values.shape,
                initializer="zeros",
                trainable=False,
                name="cross_table",
            )
            self.wide_crosses.table.assign(self.wide_crosses.values)
        self.built = True  # every weight exists: the fused tables above, the rest trained

    def call(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        return self.score(self.shared_side.index(inputs), self.candidate_side.index(inputs), inputs)

    def score(
        self,
        shared_index: tf.Tensor | None,
        candidate_index: tf.Tensor | None,
        inputs: Mapping[str, tf.Tensor],
    ) -> tf.Tensor:
        """The scores from each side's table rows (:meth:`_Side.index`) and the numeric
        ``inputs``: no string op, so XLA can compile it (the ``indexed`` signature)."""
        # the candidates' first input; without strings, their table rows
        first = inputs.get(self.first_input, candidate_index)
        n = tf.shape(first)[:1]
        rows = self._join(
            self.shared_side.gather(shared_index),
            self.candidate_side.gather(candidate_index),
            n,
            self.cat_perm,
        )
        dense = self._join(
            self.shared_side.numbers(inputs), self.candidate_side.numbers(inputs), n, self.num_perm
        )
        parts = []
        if rows is not None:
            features = len(self.categorical_order)
            parts.append(tf.reshape(rows[:, :, : self.dim], [-1, features * self.dim]))
        if dense is not None:
            parts.append(dense)
        x0 = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        crossed = x0
        for cross in self.crosses:
            crossed = cross([x0, crossed])
        deep = self.deep(x0, training=False)
        logit = tf.squeeze(self.logit(tf.concat([crossed, deep], axis=1)), -1)
        if self.wide and rows is not None:
            logit = logit + tf.reduce_sum(rows[:, :, self.dim], axis=1)
        if self.wide_crosses.table is not None:
            index = self._join(shared_index, candidate_index, n, self.cat_perm)
            logit = logit + self.wide_crosses(index)
        if self.numeric_kernel is not None and dense is not None:
            width = int(self.numeric_kernel.shape[0])
            logit = logit + tf.squeeze(tf.matmul(dense[:, :width], self.numeric_kernel), -1)
        if self.fm is not None and rows is not None and self.head is not None:
            fm = self.fm.logit(rows, self.dim + (1 if self.wide else 0))
            return self.fm.blend([self.head(logit), fm])
        return self.head(logit) if self.head is not None else logit

    def call_packed(
        self, packed: Mapping[str, tf.Tensor], groups: Mapping[str, Sequence[str]]
    ) -> tf.Tensor:
        """:meth:`call` on the ``packed`` signature's tensors: each group unstacked into its named
        columns (one op per group), then the same graph."""
        return self.call(_unpack(packed, groups))

    def side_index(
        self, side: str, strings: tf.Tensor, groups: Mapping[str, Sequence[str]]
    ) -> tf.Tensor:
        """The ``shared_index`` / ``candidate_index`` signatures: one side's ``packed`` strings
        (``[rows, k]``, columns as ``groups`` names them) → its fused-table rows ``[rows, k]``
        int32 in :attr:`_Side.categorical` order (:func:`index_columns`)."""
        group = f"{side}_strings"
        inputs = _unpack({group: strings}, {group: groups[group]})
        index = (self.shared_side if side == "shared" else self.candidate_side).index(inputs)
        assert index is not None  # a side with strings has a table (checked at export)
        return index

    def call_indexed(
        self, indexed: Mapping[str, tf.Tensor], groups: Mapping[str, Sequence[str]]
    ) -> tf.Tensor:
        """The ``indexed`` signature: :meth:`call` with each side's strings replaced by its
        table rows (``shared_index`` / ``candidate_index``, from :meth:`side_index`) and the
        numbers as in ``packed``. Numeric ops only: the in-process predictor compiles it with
        XLA, and a release precomputes every ad's ``candidate_index`` row once."""
        numbers = {g: indexed[g] for g in groups if g.endswith("numbers")}
        return self.score(
            indexed.get("shared_index"), indexed.get("candidate_index"), _unpack(numbers, groups)
        )

    @staticmethod
    def _join(
        shared: tf.Tensor | None, candidate: tf.Tensor | None, n: tf.Tensor, perm: list[int] | None
    ) -> tf.Tensor | None:
        """Shared rows broadcast to the ``n`` candidates, side by side with the candidates' own,
        in the trained model's column order."""
        if shared is not None:
            shared = tf.broadcast_to(shared, tf.concat([n, tf.shape(shared)[1:]], axis=0))
        parts = [p for p in (shared, candidate) if p is not None]
        if not parts:
            return None
        joined = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        return tf.gather(joined, perm, axis=1) if perm is not None else joined


class _WideCrosses:
    """The wide part's crosses (:mod:`models.ranker.crosses`) as one flat weight table: each
    cross's cell is computed from the two features' table rows already gathered (minus their
    side's offset: the vocabulary index), so the crosses add integer arithmetic and one gather,
    no string op."""

    def __init__(
        self, model: keras.Model, order: Sequence[str], shared: _Side, candidate: _Side
    ) -> None:
        crosses = sorted(
            (layer for layer in model.layers if isinstance(layer, CrossIndex)),
            key=lambda la: int(la.name.rsplit("__", 1)[-1]),
        )
        offset = {**shared.offset_of, **candidate.offset_of}
        self.feature_offsets = tf.constant([offset[f] for f in order], dtype=tf.int32)
        self.crosses = [(c, order.index(c.left), order.index(c.right)) for c in crosses]
        weights = [
            np.asarray(
                model.get_layer(WIDE_CROSS_PREFIX + c.name.rsplit("__", 1)[-1]).get_weights()[0]
            ).reshape(-1)
            for c in crosses
        ]
        starts = np.cumsum([0, *(w.size for w in weights)])[:-1]
        self.starts = [int(v) for v in starts]
        self.values = np.concatenate(weights).astype(np.float32) if weights else None
        self.table: Any = None
        """The flat table as a weight of the owning layer (so the export tracks it)."""

    def __call__(self, rows: tf.Tensor) -> tf.Tensor:
        """``rows``: ``[N, features]`` fused-table rows in the trained model's order → the sum
        of the cross weights ``[N]``.

        Each side's vocabulary index is clipped into its vocabulary: a real row is already
        inside it, but padding rows (all-zero table rows, which lie before a feature's offset)
        gave negative cells, an out-of-range gather that failed the whole padded call."""
        vocab = rows - self.feature_offsets
        cells = [
            cross_cell(
                tf.clip_by_value(vocab[:, a], 0, c.left_size - 1),
                tf.clip_by_value(vocab[:, b], 0, c.right_size - 1),
                c.right_size,
                c.size,
                c.hashed,
            )
            + start
            for (c, a, b), start in zip(self.crosses, self.starts, strict=True)
        ]
        return tf.reduce_sum(tf.gather(self.table, tf.stack(cells, axis=1)), axis=1)


def _unpack(
    packed: Mapping[str, tf.Tensor], groups: Mapping[str, Sequence[str]]
) -> dict[str, tf.Tensor]:
    """Each ``packed`` tensor unstacked into its named columns (one op per group)."""
    inputs: dict[str, tf.Tensor] = {}
    for group, tensor in packed.items():
        names = groups[group]
        inputs.update(zip(names, tf.unstack(tensor, num=len(names), axis=1), strict=True))
    return inputs


def _permutation(grouped: Sequence[str], order: Sequence[str]) -> list[int] | None:
    """Positions in ``grouped`` of each name of ``order``; None when they are the same order."""
    if list(grouped) == list(order):
        return None
    position = {name: i for i, name in enumerate(grouped)}
    return [position[name] for name in order]


def index_columns(ranker: ServingRanker, groups: Mapping[str, Sequence[str]]) -> dict[str, list]:
    """The ``indexed`` signature's index inputs and their columns (categorical features in
    the trained model's order), or {} when a side's string inputs are not exactly its
    categorical features (then the model has no ``indexed`` signature)."""
    columns: dict[str, list] = {}
    for side_name, index_name in INDEX_SIGNATURES.items():
        side = ranker.shared_side if side_name == "shared" else ranker.candidate_side
        strings = list(groups.get(f"{side_name}_strings", []))
        if sorted(strings) != sorted(side.categorical):
            return {}
        if strings:
            columns[index_name] = list(side.categorical)
    return columns


def indexed_specs(
    groups: Mapping[str, Sequence[str]], index: Mapping[str, Sequence[str]]
) -> dict[str, tf.TensorSpec]:
    """The ``indexed`` signature's input specs: ``[None, k]`` int32 per side's table rows, and
    the ``packed`` number groups as they are."""
    specs = {
        name: tf.TensorSpec([None, len(cols)], tf.int32, name=name) for name, cols in index.items()
    }
    specs.update({g: s for g, s in packed_specs(groups).items() if g.endswith("numbers")})
    return specs
