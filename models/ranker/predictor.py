"""The in-process ranker backend: an exported model version, loaded and called in this process.

DESIGN.md's embedded default for TF Serving: serving (and the evaluation report) load the same
SavedModel TF Serving would, with ``tf.saved_model.load``, and call its ``serving_default`` or
``rank`` signature directly — no Keras, no network hop. The input names, dtypes and shapes come
from the signatures themselves, so a request is validated against the model actually loaded.

A ranker exported with the ``packed`` signature (:mod:`models.ranker.serving_graph`) is called
through it for both public signatures: the validated inputs are stacked into at most four arrays
(:func:`pack_inputs`, columns as the manifest's ``packed`` names them), so a call converts four
arrays instead of ~26; the graph and the scores are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf

from deepclick.errors import DeepclickError
from deepclick.layout import RANKER_MANIFEST
from deepclick.publish import read_manifest, verify
from models.ranker.inputs import (
    SIMILARITY_INPUTS,
    SimilarityProvider,
    columns_to_inputs,
)

OUTPUT = "pctr"
SIGNATURES = ("serving_default", "rank")
PACKED = "packed"
"""The additional signature of fused rankers (:mod:`models.ranker.serving_graph`)."""
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
            arrays = [
                np.array([v if isinstance(v, bytes) else str(v).encode() for v in a], object)
                for a in arrays
            ]
        packed[group] = np.stack(arrays, axis=1)
    return packed


class InProcessPredictor:
    """Predict click probabilities with an exported ranker version, in this process.

    Args:
        path: the version folder (``<model_repository>/<name>/<version>``).
        verify_checksums: hash every file against ``deepclick_manifest.json`` first, so a
            truncated copy or a half-synced folder fails at load, not with odd scores later.
    """

    def __init__(self, path: Path | str, *, verify_checksums: bool = True) -> None:
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
