"""Exporting a trained ranker as a TF Serving model version (DESIGN.md, ``model_repository``).

Layout: ``<model_repository>/<name>/<version>/`` with ``version`` an integer (``YYYYMMDD``, as TF
Serving requires), holding

- the SavedModel (``saved_model.pb``, ``variables/``) with two signatures, both output ``pctr``:

  - ``serving_default`` — one row per candidate, every input a ``[batch]`` tensor;
  - ``rank`` — the "common request": user and context features once, as ``[1]`` tensors, and the
    ad features (and similarity scores) of N candidates as ``[N]`` tensors. The request carries
    the user's and placement's features once instead of N times, which is most of its bytes;
  - ``packed`` (fused DCN-v2 rankers only) — the same inputs as four tensors, shared and
    per-candidate strings and numbers (:mod:`models.ranker.serving_graph`), for the in-process
    predictor; the manifest's ``packed`` names each tensor's columns. TF Serving clients keep
    ``rank`` / ``serving_default``.

- ``assets.extra/tf_serving_warmup_requests``: PredictionLog records (TFRecord) TF Serving replays
  at load, so the first real request does not pay for graph tracing;
- ``model.tflite`` and ``tflite_check.npz`` (fused rankers): the ``indexed`` signature converted to
  TensorFlow Lite, which the in-process predictor calls instead (half the CPU per call, README
  serving), and the planted rows it was checked on (:mod:`models.ranker.export_tflite`);
- ``deepclick_manifest.json``: feature-spec and embeddings versions (the pairing a release checks),
  input names and dtypes of each signature, calibration, metrics and file checksums.

The version is written through :func:`deepclick.publish.publishing`: a hidden staging folder is
filled, the SavedModel is reloaded and checked against the in-memory model, and only then renamed
into place. TF Serving ignores folders whose names are not integers, so it never sees a partial one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deepclick.publish import PublishError, Staging, publishing
from models.export_archive import write_traced_once
from models.ranker.export_tflite import MANIFEST_KEY as LITE_KEY
from models.ranker.export_tflite import write_lite
from models.ranker.inputs import candidate_inputs, rank_request, shared_inputs
from models.ranker.predictor import (
    INDEX_OUTPUT,
    INDEX_SIGNATURES,
    INDEXED,
    OUTPUT,
    PACKED,
    RANKER_MANIFEST,
    SIGNATURES,
    pack_inputs,
)
from models.ranker.serving_graph import (
    ServingRanker,
    can_fuse,
    index_columns,
    indexed_specs,
    packed_groups,
    packed_specs,
)
from models.ranker.train import TrainedRanker, predict

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_BATCHES = (1, 100)
"""Rows of the ``serving_default`` warmup requests."""
WARMUP_CANDIDATES = (100, 500)
"""Candidates of the ``rank`` warmup requests (the API's default is 500)."""
CHECK_TOLERANCE = 1e-4
"""Largest difference allowed between the reloaded SavedModel and the in-memory model."""


class RankerExportError(PublishError):
    """The export failed a check and was not published."""


def _tf_dtype(dtype: str) -> tf.DType:
    return tf.string if dtype == "string" else tf.float32


def signature_inputs(trained: TrainedRanker) -> dict[str, dict[str, tf.TensorSpec]]:
    """The input specs of both signatures: ``[None]`` everywhere for ``serving_default``; ``[1]``
    for user and context features and ``[None]`` for candidate inputs in ``rank``."""
    dtypes = {name: t.dtype for name, t in trained.model.input.items()}
    shared = set(shared_inputs(trained.spec))
    default = {n: tf.TensorSpec([None], _tf_dtype(d), name=n) for n, d in dtypes.items()}
    rank = {
        n: tf.TensorSpec([1] if n in shared else [None], _tf_dtype(d), name=n)
        for n, d in dtypes.items()
    }
    return {"serving_default": default, "rank": rank}


def _describe(specs: Mapping[str, tf.TensorSpec]) -> dict[str, dict[str, Any]]:
    return {
        name: {"dtype": spec.dtype.name, "shape": [-1 if d is None else d for d in spec.shape]}
        for name, spec in specs.items()
    }


def write_saved_model(
    trained: TrainedRanker, folder: Path, *, fused: bool = True
) -> dict[str, Any]:
    """Write the SavedModel with the ``serving_default`` and ``rank`` signatures into ``folder``;
    ``fused`` (default) writes a DCN-v2 ranker's serving graph (:mod:`models.ranker.serving_graph`)
    and its ``packed`` signature (and, when each side's strings are its categorical features, the
    ``shared_index`` / ``candidate_index`` / ``indexed`` signatures), False the Keras model's own
    graph (kept to measure the two against each other). Returns the manifest entries describing
    the extra signatures: ``packed``'s column groups and ``indexed``'s index columns ({} when
    there are none)."""
    model = trained.model
    specs = signature_inputs(trained)
    shared = set(shared_inputs(trained.spec))
    candidates = candidate_inputs(trained.spec, trained.uses_similarity)

    archive = keras.export.ExportArchive()
    described: dict[str, Any] = {}
    if fused and can_fuse(model):  # the same function with fewer ops (models.ranker.serving_graph)
        fused = ServingRanker(model, trained.spec, sorted(shared))
        archive.track(fused)  # not the Keras model: its per-feature tables would be saved twice

        def serving_default(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {OUTPUT: fused.call(inputs)}

        rank = serving_default  # shared inputs [1] are broadcast inside, after their lookups
        groups = packed_groups(specs["rank"])

        def packed(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {OUTPUT: fused.call_packed(inputs, groups)}

        archive.add_endpoint(PACKED, packed, [packed_specs(groups)])
        index = index_columns(fused, groups)
        if index:  # strings looked up apart, the rest numeric (XLA; precomputed ad rows)
            for side, name in INDEX_SIGNATURES.items():
                if name in index:
                    group = f"{side}_strings"
                    archive.add_endpoint(
                        name,
                        _side_index(fused, side, groups),
                        [packed_specs({group: groups[group]})[group]],
                    )

            def indexed(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
                return {OUTPUT: fused.call_indexed(inputs, groups)}

            archive.add_endpoint(INDEXED, indexed, [indexed_specs(groups, index)])
            described[INDEXED] = index
        described[PACKED] = groups
    else:

        def serving_default(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {OUTPUT: model(inputs, training=False)}

        def rank(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            n = tf.shape(inputs[candidates[0]])[:1]
            rows = {k: tf.broadcast_to(v, n) if k in shared else v for k, v in inputs.items()}
            return {OUTPUT: model(rows, training=False)}

        archive.track(model)
    archive.add_endpoint("serving_default", serving_default, [specs["serving_default"]])
    archive.add_endpoint("rank", rank, [specs["rank"]])
    write_traced_once(archive, folder)
    return described


def _side_index(
    fused: ServingRanker, side: str, groups: dict[str, list[str]]
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    def side_index(strings: tf.Tensor) -> dict[str, tf.Tensor]:
        return {INDEX_OUTPUT: fused.side_index(side, strings, groups)}

    return side_index


def warmup_inputs(trained: TrainedRanker) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Warmup requests of both signatures built from real held-out rows: ``serving_default`` with
    1 and 100 rows, ``rank`` with 100 and 500 candidates sharing the first row's user/context."""
    rows = trained.split.calibration
    if rows.empty:
        rows = trained.split.fit
    largest = max(*WARMUP_BATCHES, *WARMUP_CANDIDATES)
    sample = rows.iloc[np.resize(np.arange(len(rows)), largest)].reset_index(drop=True)
    shared = shared_inputs(trained.spec)
    common = sample.copy()
    for name in shared:
        common[name] = sample[name].iloc[0]
    per_row = trained.inputs(sample)
    per_candidate = trained.inputs(common)
    requests: list[tuple[str, dict[str, np.ndarray]]] = [
        ("serving_default", {k: v[:n] for k, v in per_row.items()}) for n in WARMUP_BATCHES
    ]
    for n in WARMUP_CANDIDATES:
        sliced = {k: v[:n] for k, v in per_candidate.items()}
        requests.append(("rank", rank_request(sliced, shared)))
    return requests


def write_warmup(
    folder: Path, model_name: str, requests: list[tuple[str, dict[str, np.ndarray]]]
) -> Path:
    """Write ``assets.extra/tf_serving_warmup_requests``: one PredictionLog per request."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = folder / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature),
                output_filter=[OUTPUT],
            )
            for name, values in inputs.items():
                dtype = tf.string if values.dtype == object else tf.float32
                request.inputs[name].CopyFrom(
                    tf.make_tensor_proto(
                        values.tolist() if dtype == tf.string else values, dtype=dtype
                    )
                )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def _check(
    loaded: Any,
    trained: TrainedRanker,
    requests: list[tuple[str, dict[str, np.ndarray]]],
    groups: dict[str, list[str]] | None = None,
    index: dict[str, list[str]] | None = None,
) -> dict[str, float]:
    """Compare every signature of the reloaded SavedModel ``loaded`` with the in-memory model
    on the warmup requests (``packed`` with the same requests packed by ``groups``, ``indexed``
    with their strings looked up by the reloaded ``*_index`` signatures); return the largest
    difference per signature."""
    shared = set(shared_inputs(trained.spec))
    names = (*SIGNATURES, PACKED) if groups else SIGNATURES
    if groups and index:
        names = (*names, INDEXED)
    worst: dict[str, float] = dict.fromkeys(names, 0.0)
    for signature, inputs in requests:
        n = max(len(v) for v in inputs.values())
        rows = {k: np.resize(v, n) if k in shared else v for k, v in inputs.items()}
        expected = predict(trained.model, rows)
        calls = [(signature, inputs)]
        if groups:
            packed = pack_inputs(inputs, groups)
            calls.append((PACKED, packed))
            if index:
                calls.append((INDEXED, _indexed_inputs(loaded, packed, index)))
        for name, feeds_np in calls:
            if name not in loaded.signatures:
                raise RankerExportError(f"the exported SavedModel has no {name!r} signature")
            feeds = {
                k: tf.constant(v, dtype=_feed_dtype(v.dtype.kind)) for k, v in feeds_np.items()
            }
            got = loaded.signatures[name](**feeds)[OUTPUT].numpy()
            if got.shape != expected.shape or not np.all(np.isfinite(got)):
                raise RankerExportError(
                    f"signature {name!r} returned {got.shape} values (finite: "
                    f"{bool(np.all(np.isfinite(got)))}), expected {expected.shape}"
                )
            worst[name] = max(worst[name], float(np.max(np.abs(got - expected))))
    for signature, diff in worst.items():
        if diff > CHECK_TOLERANCE:
            raise RankerExportError(
                f"reloaded signature {signature!r} differs from the trained model by {diff:.2e} "
                f"(> {CHECK_TOLERANCE:g}); not publishing"
            )
    return worst


def _feed_dtype(kind: str) -> tf.DType:
    return tf.string if kind in "OSU" else tf.int32 if kind == "i" else tf.float32


def _indexed_inputs(
    loaded: Any, packed: dict[str, np.ndarray], index: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """``packed`` with each side's strings replaced by the reloaded model's table rows."""
    feeds = {g: v for g, v in packed.items() if not g.endswith("strings")}
    for side, name in INDEX_SIGNATURES.items():
        if name in index:
            group = f"{side}_strings"
            strings = tf.constant(packed[group], dtype=tf.string)
            feeds[name] = loaded.signatures[name](**{group: strings})[INDEX_OUTPUT].numpy()
    return feeds


def ranker_manifest(trained: TrainedRanker, model_name: str) -> dict[str, Any]:
    """What a release and the predictor need to know about the model, beside its checksums."""
    specs = signature_inputs(trained)
    output = {OUTPUT: {"dtype": "float32", "shape": [-1]}}
    return {
        "stage": "ranker",
        "model_name": model_name,
        "feature_spec_version": trained.spec.version,
        "embedding_version": trained.embedding_version,
        "dataset": trained.spec.dataset,
        "missing_value": trained.spec.missing_value,
        "inputs": {"features": trained.spec.version, "embeddings": trained.embedding_version},
        "architecture": trained.settings.architecture,
        "settings": trained.settings.model_dump(),
        "similarity_inputs": [n for n in trained.input_names if n.startswith("sim_")],
        "signatures": {
            name: {"inputs": _describe(spec), "outputs": output} for name, spec in specs.items()
        },
        "rank": {
            "shared": shared_inputs(trained.spec),
            "candidates": candidate_inputs(trained.spec, trained.uses_similarity),
        },
        "calibration": trained.calibration,
        "split": trained.split.describe(),
        "counts": {
            "fit_rows": int(trained.metrics.get("fit_rows", len(trained.split.fit))),
            "calibration_rows": len(trained.split.calibration),
        },
        "metrics": {k: v for k, v in trained.metrics.items() if math.isfinite(v)},
    }


def export_ranker(
    trained: TrainedRanker,
    model_repository: Path,
    name: str,
    version: str,
    manifest_extra: Mapping[str, Any] | None = None,
    *,
    update_current: bool = True,
    fused: bool = True,
    tflite: bool = True,
) -> Path:
    """Publish ``trained`` as ``<model_repository>/<name>/<version>/`` and return that folder.

    Args:
        trained: the output of :func:`models.ranker.train.train_ranker`.
        model_repository: the TF Serving model base folder (settings ``model_repository``).
        name: the model name TF Serving serves it under (settings ``predictor.model_name``).
        version: an integer string, by convention ``version_for(target day)``.
        manifest_extra: more manifest entries (e.g. MLflow run id); they win over computed ones.
        update_current: also point ``<name>/CURRENT`` at this version (TF Serving ignores the
            file; the in-process predictor and releases may use it).
        fused: write the fused serving graph (see :func:`write_saved_model`).
        tflite: also convert the ``indexed`` signature to ``model.tflite``, checked against the
            SavedModel (:func:`models.ranker.export_tflite.write_lite`; fused rankers only).

    Raises:
        ValueError: ``version`` is not a non-negative integer.
        RankerExportError: the reloaded SavedModel does not reproduce the in-memory predictions;
            nothing is published.
    """
    if not version.isdigit():
        raise ValueError(
            f"model version {version!r} must be an integer (TF Serving loads only numeric "
            "version folders); use deepclick.layout.version_for(date)"
        )
    requests = warmup_inputs(trained)
    parent = Path(model_repository) / name

    def validate(staging: Staging) -> None:
        loaded = tf.saved_model.load(str(staging.path))
        groups, index = staging.manifest.get(PACKED), staging.manifest.get(INDEXED)
        staging.manifest.setdefault("checks", {})["max_abs_difference"] = _check(
            loaded, trained, requests, groups, index
        )
        if groups and index and tflite:
            staging.manifest[LITE_KEY] = write_lite(
                staging.path,
                loaded,
                [inputs for signature, inputs in requests if signature == "rank"],
                lambda inputs: _indexed_inputs(loaded, pack_inputs(inputs, groups), index),
                groups.get("candidate_strings", []),
            )

    with publishing(
        parent,
        version,
        manifest_name=RANKER_MANIFEST,
        update_current=update_current,
        validate=validate,
    ) as staging:
        described = write_saved_model(trained, staging.path, fused=fused)
        write_warmup(staging.path, name, requests)
        staging.manifest.update(ranker_manifest(trained, name))
        # the packed (and indexed) signatures' columns, read back by the in-process predictor
        staging.manifest.update(described)
        staging.manifest["warmup"] = [
            {"signature": s, "rows": max(len(v) for v in inputs.values())} for s, inputs in requests
        ]
        staging.manifest.update(dict(manifest_extra or {}))
    return parent / version


def read_warmup(folder: Path) -> list[Any]:
    """The PredictionLog records of a version's warmup file (for checks and tests)."""
    from tensorflow_serving.apis import prediction_log_pb2

    records = []
    for raw in tf.data.TFRecordDataset(str(Path(folder) / WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        records.append(log)
    return records
