"""The in-process ranker backend: an exported model version, loaded and called in this process.

DESIGN.md's embedded default for TF Serving: serving (and the evaluation report) load the same
SavedModel TF Serving would, with ``tf.saved_model.load``, and call its ``serving_default`` or
``rank`` signature directly — no Keras, no network hop. The input names, dtypes and shapes come
from the signatures themselves, so a request is validated against the model actually loaded.

A ranker exported with the ``packed`` signature (:mod:`models.ranker.serving_graph`) is called
through it for both public signatures: the validated inputs are stacked into at most four arrays
(:func:`pack_inputs`, columns as the manifest's ``packed`` names them), so a call converts four
arrays instead of ~26; the graph and the scores are the same.

A ranker that also has the ``indexed`` signature (issue 14) is called through that one instead:
the strings are looked up apart — the user's and placement's values remembered per value, the
candidates' rows either passed in (a release precomputes every ad's rows at load:
:meth:`InProcessPredictor.candidate_index`, request key :data:`CANDIDATE_INDEX`) or looked up by
the ``candidate_index`` signature — and the call itself is numeric. With ``xla`` that call is
compiled by XLA on rows padded to :data:`XLA_BUCKETS`; measured slower than the plain call on this
ranker (README, serving), so off by default (settings ``predictor.xla``).

With ``lite`` (settings ``predictor.tflite``, the default) the ``indexed`` call runs on the
export's TensorFlow Lite conversion of that signature instead (:mod:`models.ranker.export_tflite`:
about half the CPU per call, no inter-op thread hand-off), but only after it scored the export's
planted rows as the SavedModel does, checked here at load; a version without the file, or one
whose file fails to load or disagrees, is served by the SavedModel call (:attr:`lite_fallback`
says why). A listed file that is missing or altered fails the checksums like any other file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from deepclick.errors import DeepclickError
from deepclick.layout import RANKER_MANIFEST
from deepclick.publish import read_manifest, verify
from deepclick.sorted_ids import sorted_rows
from models.ranker.inputs import (
    CANDIDATE_INDEX,
    SIMILARITY_INPUTS,
    SimilarityProvider,
    columns_to_inputs,
)

log = logging.getLogger(__name__)

OUTPUT = "pctr"
SIGNATURES = ("serving_default", "rank")
PACKED = "packed"
"""The additional signature of fused rankers (:mod:`models.ranker.serving_graph`)."""
INDEXED = "indexed"
"""The numeric-only signature of fused rankers: each side's categorical values as rows of its
fused table instead of strings (:meth:`models.ranker.serving_graph.ServingRanker.call_indexed`)."""
INDEX_SIGNATURES = {"shared": "shared_index", "candidate": CANDIDATE_INDEX}
"""Per side: the signature turning its ``packed`` strings into table rows, which is also the name
of those rows as an ``indexed`` input (``[rows, k]`` int32)."""
INDEX_OUTPUT = "index"
XLA_BUCKETS = (64, 128, 256, 512, 1024, 2048)
"""Row counts the XLA-compiled call is padded to (one compiled program each; more rows: the next
multiple of the largest)."""
MEMO_LIMIT = 1 << 16
"""Entries per column of the shared-side value → table row memo before it is cleared."""
FRAME_BATCH = 8192
"""Rows per ``serving_default`` call when scoring a whole table."""


class PredictorInputError(DeepclickError, ValueError):
    """A request does not fit the model's signature; the message names the inputs at fault."""


def packed_dtype(group: str) -> tf.DType:
    """The dtype of one ``packed`` input: its string groups carry strings, the others float32
    (the groups are :data:`models.ranker.serving_graph.PACKED_GROUPS`)."""
    return tf.string if group.endswith("strings") else tf.float32


def pack_inputs(
    columns: Mapping[str, np.ndarray], groups: Mapping[str, list[str]]
) -> dict[str, np.ndarray]:
    """The ``packed`` signature's arrays: per group its columns side by side (``[rows, k]``).

    ``columns`` are validated input arrays (strings as bytes, str or objects; numbers float32);
    string columns of mixed kinds become one object array of UTF-8 bytes."""
    packed = {}
    for group, names in groups.items():
        arrays = [np.asarray(columns[n]).reshape(-1) for n in names]
        if packed_dtype(group) == tf.string and any(a.dtype.kind != "S" for a in arrays):
            arrays = [_as_bytes(a).astype(object) for a in arrays]
        packed[group] = np.stack(arrays, axis=1)
    return packed


def bucket_rows(n: int) -> int:
    """The padded row count of an XLA call for ``n`` rows (:data:`XLA_BUCKETS`)."""
    for bucket in XLA_BUCKETS:
        if n <= bucket:
            return bucket
    step = XLA_BUCKETS[-1]
    return -(-n // step) * step


def _padded(feeds: Mapping[str, np.ndarray], n: int, rows: int) -> dict[str, np.ndarray]:
    """Every ``n``-row array padded with zero rows to ``rows`` (row 0 of each table and zero
    numbers: valid inputs whose scores are cut off); ``[1, k]`` shared arrays stay."""
    out = {}
    for name, values in feeds.items():
        if len(values) == n and rows > n:
            values = np.concatenate([values, np.zeros((rows - n, *values.shape[1:]), values.dtype)])
        out[name] = values
    return out


def _as_key(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _as_bytes(values: np.ndarray) -> np.ndarray:
    """String values as one array of UTF-8 bytes (``S`` kept as is)."""
    if values.dtype.kind == "S":
        return values
    return np.array([_as_key(v) for v in values.reshape(-1)], dtype=object)


class InProcessPredictor:
    """Predict click probabilities with an exported ranker version, in this process.

    Args:
        path: the version folder (``<model_repository>/<name>/<version>``).
        verify_checksums: hash every file against ``deepclick_manifest.json`` first, so a
            truncated copy or a half-synced folder fails at load, not with odd scores later.
        xla: compile the ``indexed`` call with XLA (rows padded to :data:`XLA_BUCKETS`; call
            :meth:`compile` at load so that requests never wait for a compilation). Ignored
            for a model without the ``indexed`` signature, and when the TFLite call is used.
        lite: call the ``indexed`` signature through the export's checked TFLite model (see
            the module doc); ignored for a model without the ``indexed`` signature.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        verify_checksums: bool = True,
        xla: bool = False,
        lite: bool = False,
    ) -> None:
        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise FileNotFoundError(f"{self.path} holds no saved_model.pb: not a ranker version")
        self.manifest: dict[str, Any] = (
            verify(self.path, RANKER_MANIFEST)
            if verify_checksums
            else read_manifest(self.path, RANKER_MANIFEST)
        )
        self._loaded = tf.saved_model.load(str(self.path))
        missing = [s for s in SIGNATURES if s not in self._loaded.signatures]
        if missing:
            raise PredictorInputError(f"{self.path} lacks signature(s) {', '.join(missing)}")
        self._functions = {s: self._loaded.signatures[s] for s in SIGNATURES}
        self._specs: dict[str, dict[str, tf.TensorSpec]] = {
            s: dict(f.structured_input_signature[1]) for s, f in self._functions.items()
        }
        # per signature, per input: (dtype, is a string, sent once per request) — read once here,
        # not per request (TensorShape and DType comparisons are slow Python on the hot path)
        self._plans: dict[str, list[tuple[str, tf.DType, bool, bool]]] = {
            s: [
                (n, spec.dtype, spec.dtype == tf.string, spec.shape.as_list() == [1])
                for n, spec in specs.items()
            ]
            for s, specs in self._specs.items()
        }
        groups = self.manifest.get(PACKED)
        self._packed = (
            self._loaded.signatures[PACKED]
            if groups and PACKED in self._loaded.signatures
            else None
        )
        self._groups: dict[str, list[str]] = dict(groups) if self._packed is not None else {}
        self._per_candidate = self.candidate_inputs
        index = self.manifest.get(INDEXED) or {}
        usable = self._packed is not None and all(
            name in self._loaded.signatures for name in (INDEXED, *index)
        )
        self._index_columns: dict[str, list[str]] = dict(index) if index and usable else {}
        self._indexed = self._loaded.signatures[INDEXED] if self._index_columns else None
        self._memo: dict[str, dict[bytes, int]] = {}
        self._known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        """Per shared column: every known value (sorted) and its table row
        (:meth:`remember_values`)."""
        self._lite: Any = None
        self.lite_fallback: str | None = None
        """Why a requested TFLite call is not used (None when it is, or was not requested)."""
        if lite and self._indexed is not None:
            self._lite, self.lite_fallback = self._load_lite()
        self.xla = bool(xla and self._indexed is not None and self._lite is None)
        self._score: Any = self._indexed
        if self.xla:
            indexed = self._indexed
            self._score = tf.function(
                lambda **feeds: indexed(**feeds), jit_compile=True, reduce_retracing=True
            )

    def _load_lite(self) -> tuple[Any, str | None]:
        """The checked TFLite call of this version, or None and the reason it is not used."""
        from models.ranker import export_tflite

        entry = self.manifest.get(export_tflite.MANIFEST_KEY) or {}
        if "file" not in entry:
            return None, entry.get("refused", "the export has no TFLite model")
        try:
            lite = export_tflite.LiteCall(self.path / entry["file"])
            cases = export_tflite.load_cases(self.path / entry["check_file"])
            export_tflite.check_lite(lite, self._indexed, cases)
        except Exception as exc:  # unreadable or disagreeing: the SavedModel call serves
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("ranker %s: TFLite model not used (%s)", self.path, reason)
            return None, reason
        return lite, None

    @property
    def lite(self) -> bool:
        """Whether the ``indexed`` call runs on the checked TFLite model (see the module doc)."""
        return self._lite is not None

    @property
    def call(self) -> str:
        """Which call scores a request: ``tflite``, ``xla``, ``indexed``, ``packed`` or
        ``public`` (the first this version and the settings allow)."""
        for name, used in (
            ("tflite", self.lite),
            ("xla", self.xla),
            ("indexed", self.indexed),
            ("packed", self.packed),
        ):
            if used:
                return name
        return "public"

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", self.path.name))

    @property
    def feature_spec_version(self) -> str | None:
        return self.manifest.get("feature_spec_version")

    @property
    def embedding_version(self) -> str | None:
        return self.manifest.get("embedding_version")

    @property
    def uses_similarity(self) -> bool:
        return all(n in self._specs["serving_default"] for n in SIMILARITY_INPUTS)

    def input_names(self, signature: str = "serving_default") -> list[str]:
        return list(self._spec(signature))

    @property
    def shared_inputs(self) -> list[str]:
        """``rank`` inputs sent once per request (user and context features, ``[1]`` tensors)."""
        return [n for n, s in self._specs["rank"].items() if s.shape.as_list() == [1]]

    @property
    def candidate_inputs(self) -> list[str]:
        """``rank`` inputs sent once per candidate (ad features and scores, ``[N]`` tensors)."""
        return [n for n, s in self._specs["rank"].items() if s.shape.as_list() != [1]]

    def _spec(self, signature: str) -> dict[str, tf.TensorSpec]:
        if signature not in self._specs:
            raise PredictorInputError(
                f"unknown signature {signature!r}: the ranker has {', '.join(SIGNATURES)}"
            )
        return self._specs[signature]

    @property
    def packed(self) -> bool:
        """Whether calls go through the ``packed`` signature (see the module doc)."""
        return self._packed is not None

    @property
    def indexed(self) -> bool:
        """Whether calls go through the ``indexed`` signature (see the module doc)."""
        return self._indexed is not None

    def candidate_index(self, features: Mapping[str, Any]) -> np.ndarray:
        """The candidates' fused-table rows ``[N, k]`` int32 (the ``indexed`` signature's
        :data:`CANDIDATE_INDEX`) from their string inputs in ``features`` (any N; e.g. a whole
        ads table at release load, so that requests gather rows instead of hashing strings).

        Raises:
            PredictorInputError: the model has no ``indexed`` signature, or an input is missing.
        """
        if CANDIDATE_INDEX not in self._index_columns:
            raise PredictorInputError(
                f"model version {self.version} has no {INDEXED!r} signature with candidate "
                "strings: export it again to precompute candidate rows"
            )
        group = "candidate_strings"
        missing = [n for n in self._groups[group] if n not in features]
        if missing:
            raise PredictorInputError(f"candidate_index needs input(s) {', '.join(missing)}")
        strings = self._packed_strings(features, group)
        rows = len(strings[group])
        out = np.empty((rows, len(self._index_columns[CANDIDATE_INDEX])), np.int32)
        function = self._loaded.signatures[CANDIDATE_INDEX]
        for start in range(0, rows, FRAME_BATCH):
            chunk = tf.constant(strings[group][start : start + FRAME_BATCH], dtype=tf.string)
            out[start : start + FRAME_BATCH] = function(**{group: chunk})[INDEX_OUTPUT].numpy()
        return out

    def remember_values(self, column: str, values: np.ndarray) -> bool:
        """At release load: the table row of every value of one shared string column (e.g. every
        known user id; ``values`` sorted fixed-width bytes, as an entity table holds them), so
        that a request whose user this worker has not seen yet costs no ``shared_index`` call
        (a string-op TF call: +2.5 ms per request, measured, docs/history/serving.md). ``values`` is
        kept by reference (a mapped table is not copied); the rows cost 4 bytes per value.
        Returns whether the column is one the ``indexed`` call looks up."""
        names = self._index_columns.get("shared_index", [])
        if column not in names or not len(values):
            return False
        group = "shared_strings"
        position, j = self._groups[group].index(column), names.index(column)
        function = self._loaded.signatures["shared_index"]
        rows = np.empty(len(values), np.int32)
        for start in range(0, len(values), FRAME_BATCH):
            chunk = np.asarray(values[start : start + FRAME_BATCH])
            packed = np.full((len(chunk), len(self._groups[group])), b"", dtype=object)
            packed[:, position] = chunk  # the other columns' values do not move column j
            out = function(**{group: tf.constant(packed, dtype=tf.string)})[INDEX_OUTPUT]
            rows[start : start + len(chunk)] = out.numpy()[:, j]
        self._known[column] = (values, rows)
        return True

    def _row_of(self, name: str, memo: dict[bytes, int], key: bytes) -> int | None:
        """``key``'s table row from the memo or the remembered values (None: not known)."""
        hit = memo.get(key)
        if hit is None and name in self._known:
            ids, rows = self._known[name]
            found = sorted_rows(ids, [key])[0]
            hit = int(rows[found]) if found >= 0 else None
        return hit

    def _packed_strings(self, columns: Mapping[str, Any], group: str) -> dict[str, np.ndarray]:
        """One string group of the ``packed`` form (``{group: [rows, k]}``) from ``columns``."""
        names = self._groups[group]
        return pack_inputs({n: columns[n] for n in names}, {group: names})

    def _shared_index(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The shared side's table rows ``[B, k]``: each value's row is remembered per column
        (the vocabularies are fixed, so a value's row never changes), and only a request with a
        value not seen yet calls the ``shared_index`` signature."""
        names = self._index_columns["shared_index"]
        rows = columns[names[0]].size
        out = np.empty((rows, len(names)), np.int32)
        found = True
        for j, name in enumerate(names):
            memo = self._memo.setdefault(name, {})
            values = columns[name]
            if rows == 1:
                hit = self._row_of(name, memo, _as_key(values[0]))
                if hit is None:
                    found = False
                    break
                out[0, j] = hit
            else:  # rows of many requests come in runs (one request's value repeated)
                starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
                hits = [self._row_of(name, memo, _as_key(v)) for v in values[starts]]
                if None in hits:
                    found = False
                    break
                out[:, j] = np.repeat(np.asarray(hits, np.int32), np.diff(np.r_[starts, rows]))
        if found:
            return out
        group = "shared_strings"
        strings = self._packed_strings(columns, group)
        function = self._loaded.signatures["shared_index"]
        out = function(**{group: tf.constant(strings[group], dtype=tf.string)})[
            INDEX_OUTPUT
        ].numpy()
        for j, name in enumerate(names):
            memo = self._memo.setdefault(name, {})
            if len(memo) > MEMO_LIMIT:
                memo.clear()
            unique, first = np.unique(_as_bytes(columns[name]), return_index=True)
            memo.update(zip(unique.tolist(), out[first, j].tolist(), strict=True))
        return out

    def _predict_indexed(
        self, columns: Mapping[str, np.ndarray], candidate_index: Any | None
    ) -> np.ndarray:
        """Scores through the ``indexed`` signature (XLA-compiled when :attr:`xla`)."""
        n = columns[self._per_candidate[0]].size
        feeds: dict[str, np.ndarray] = {
            g: np.stack([columns[c] for c in names], axis=1)
            for g, names in self._groups.items()
            if not g.endswith("strings")
        }
        if "shared_index" in self._index_columns:
            feeds["shared_index"] = self._shared_index(columns)
        if CANDIDATE_INDEX in self._index_columns:
            width = len(self._index_columns[CANDIDATE_INDEX])
            if candidate_index is None:
                candidate_index = self.candidate_index(columns)
            candidate_index = np.asarray(candidate_index, dtype=np.int32)
            if candidate_index.shape != (n, width):
                raise PredictorInputError(
                    f"{CANDIDATE_INDEX} has shape {candidate_index.shape}, expected ({n}, {width})"
                )
            feeds[CANDIDATE_INDEX] = candidate_index
        if self._lite is not None:
            return self._lite(feeds)[:n]
        if self.xla:
            feeds = _padded(feeds, n, bucket_rows(n))
        scores = self._score(**{k: tf.constant(v) for k, v in feeds.items()})[OUTPUT]
        return scores.numpy()[:n]

    def compile(self, rows: Sequence[int] = (1, 500)) -> list[int]:
        """Compile the XLA call for every bucket up to the largest of ``rows`` candidates, for
        one request (shared inputs once) and for rows of many (the micro-batcher's form), so that
        no request pays for a compilation; returns the buckets (none without :attr:`xla`)."""
        if not self.xla:
            return []
        largest = bucket_rows(max(rows))
        buckets = [b for b in XLA_BUCKETS if b <= largest] or [largest]
        for bucket in buckets:
            for shared_rows in (1, bucket):
                feeds = {
                    name: tf.zeros(
                        [shared_rows if name.startswith("shared") else bucket, len(cols)],
                        dtype=tf.int32 if name.endswith("index") else tf.float32,
                    )
                    for name, cols in self._indexed_inputs().items()
                }
                self._score(**feeds)
        return buckets

    def _indexed_inputs(self) -> dict[str, list[str]]:
        """The ``indexed`` signature's inputs and their columns."""
        numbers = {g: names for g, names in self._groups.items() if not g.endswith("strings")}
        return {**numbers, **self._index_columns}

    def _columns(self, features: Mapping[str, Any], signature: str) -> dict[str, np.ndarray]:
        """``signature``'s inputs from ``features``, checked and flattened: numbers float32,
        strings as given (bytes, str or objects), once-per-request inputs of size 1, per-row
        inputs of one length."""
        specs = self._spec(signature)
        missing = [n for n in specs if n not in features]
        if missing:
            raise PredictorInputError(
                f"{signature} request lacks input(s) {', '.join(missing)} "
                f"(model version {self.version}, feature spec {self.feature_spec_version})"
            )
        columns: dict[str, np.ndarray] = {}
        lengths: dict[str, int] = {}
        for name, _, is_string, once in self._plans[signature]:
            values = np.asarray(features[name])
            if not is_string:
                try:
                    values = values.astype(np.float32, copy=False)
                except (TypeError, ValueError):
                    raise PredictorInputError(
                        f"{signature}: {name} is numeric (float32), got {values[:3].tolist()}..."
                    ) from None
            elif values.dtype.kind not in "USO":
                values = values.astype(str)  # ids or codes sent as numbers
            if once:
                if values.size != 1:
                    raise PredictorInputError(
                        f"{signature}: {name} is sent once per request (shape [1]), "
                        f"got {values.size} values"
                    )
                values = values.reshape(1)
            else:
                values = values.reshape(-1)
                lengths[name] = values.size
            columns[name] = values
        if len(set(lengths.values())) > 1:
            sizes = ", ".join(f"{n}={k}" for n, k in sorted(lengths.items()))
            raise PredictorInputError(f"{signature}: per-row inputs differ in length ({sizes})")
        return columns

    def _feeds(self, features: Mapping[str, Any], signature: str) -> dict[str, tf.Tensor]:
        columns = self._columns(features, signature)
        feeds: dict[str, tf.Tensor] = {}
        for name, dtype, _, _ in self._plans[signature]:
            values = columns[name]
            try:
                feeds[name] = tf.constant(values, dtype=dtype)
            except (TypeError, ValueError):  # an object array mixing str with other types
                feeds[name] = tf.constant(values.astype(str), dtype=dtype)
        return feeds

    def predict(
        self, features: Mapping[str, Any], signature: str = "serving_default"
    ) -> np.ndarray:
        """Calibrated click probabilities, one per row (``serving_default``) or per candidate
        (``rank``). Extra keys in ``features`` are ignored; values may be lists or arrays.

        Raises:
            PredictorInputError: a needed input is missing, has the wrong shape, or the per-row
                inputs differ in length.
        """
        if self._packed is None:
            feeds = self._feeds(features, signature)
            if not feeds or next(iter(feeds.values())).shape[0] == 0:
                return np.zeros(0, dtype=np.float32)
            return self._functions[signature](**feeds)[OUTPUT].numpy()
        columns = self._columns(features, signature)
        if not columns or any(columns[n].size == 0 for n in self._per_candidate):
            return np.zeros(0, dtype=np.float32)
        if self._indexed is not None:
            return self._predict_indexed(columns, features.get(CANDIDATE_INDEX))
        packed = pack_inputs(columns, self._groups)
        feeds = {
            name: tf.constant(values, dtype=packed_dtype(name)) for name, values in packed.items()
        }
        return self._packed(**feeds)[OUTPUT].numpy()

    def predict_frame(
        self,
        frame: pd.DataFrame,
        *,
        similarity: SimilarityProvider | None = None,
        batch: int = FRAME_BATCH,
    ) -> np.ndarray:
        """Score every row of a table (e.g. a features folder's ``eval``) with ``serving_default``.

        Missing categorical values become the spec's missing marker, missing numbers NaN (the model
        maps NaN to the feature's default). When the model takes similarity scores they are computed
        with ``similarity`` (or read from the table's ``sim_*`` columns).

        Raises:
            PredictorInputError: the model needs similarity scores and neither a provider nor the
                columns are given.
        """
        specs = self._specs["serving_default"]
        dtypes = {n: "string" if s.dtype == tf.string else "float32" for n, s in specs.items()}
        if (
            self.uses_similarity
            and similarity is None
            and not set(SIMILARITY_INPUTS) <= set(frame.columns)
        ):
            raise PredictorInputError(
                f"model version {self.version} takes two-tower scores "
                f"({', '.join(SIMILARITY_INPUTS)}); pass a similarity provider for embeddings "
                f"{self.embedding_version}"
            )
        missing_value = str(self.manifest.get("missing_value", "__missing__"))
        out = []
        for start in range(0, len(frame), batch):
            chunk = frame.iloc[start : start + batch]
            inputs = columns_to_inputs(
                chunk,
                dtypes,  # type: ignore[arg-type]
                missing_value=missing_value,
                similarity=similarity if self.uses_similarity else None,
            )
            out.append(self.predict(inputs))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
