"""The ranker's numeric call as a TensorFlow Lite model, converted from the exported SavedModel.

Issue 14: the ``indexed`` signature (numbers and table rows in, ``pctr`` out) costs 2-5 ms CPU per
500-candidate call through TensorFlow's executor, most of it a fixed per-call cost (op dispatch,
the inter-op thread hand-off) that a smaller ranker does not move. The same signature converted
by :class:`tf.lite.TFLiteConverter` (builtin ops only; XNNPACK runs it on the calling thread) took
about half the CPU on the same rows (README, serving). So the export converts it once, beside
the SavedModel, as ``model.tflite`` — the file name TF Serving's ``--prefer_tflite_model`` reads
from a version folder; that file holds only ``indexed`` (which needs the table rows a release
precomputes), so TF Serving clients keep the SavedModel's ``rank`` / ``serving_default``.

A converted model is trusted only after it scored planted rows as the SavedModel does (to
:data:`TOLERANCE`): at export (:func:`write_lite`, else the file is not written and the manifest
says why) and again at every load (:func:`check_lite`, called by the in-process predictor, which
falls back to the SavedModel call when it fails). The planted rows are the export's warmup
requests in ``indexed`` form, plus ads no vocabulary holds (their OOV rows), all-zero padding
rows, and the micro-batcher's form (shared rows repeated per candidate); they are saved as
:data:`CHECK_FILE` so that the load-time check needs nothing but the version folder.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from models.ranker.predictor import INDEXED, OUTPUT

LITE_FILE = "model.tflite"
"""The converted ``indexed`` signature, in the version folder (TF Serving's file name)."""
CHECK_FILE = "tflite_check.npz"
"""The planted ``indexed`` rows both checks score (keys ``<case>/<input>``)."""
MANIFEST_KEY = "tflite"
TOLERANCE = 1e-5
"""Largest difference allowed between the TFLite and the SavedModel scores of a planted row."""
OOV_VALUE = b"__deepclick_tflite_check_oov__"
"""A string no vocabulary holds: the planted OOV ads' values."""


class LiteCall:
    """The ``indexed`` signature of ``model.tflite`` on one TFLite interpreter (1 thread).

    An interpreter is not thread-safe: calls are serialised by a lock (one call at a time per
    worker, as TF's single inter-op thread did). Inputs of a new shape are resized on the call.

    Raises:
        ValueError: the file is not a TFLite model with an ``indexed`` signature.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice (LiteRT)
            warnings.simplefilter("ignore")
            self._interpreter = tf.lite.Interpreter(
                model_path=str(path), num_threads=max(threads, 1)
            )
        signatures = self._interpreter.get_signature_list()
        if INDEXED not in signatures:
            raise ValueError(f"{path} has no {INDEXED!r} signature (has: {sorted(signatures)})")
        self.inputs: list[str] = list(signatures[INDEXED]["inputs"])
        self._runner = self._interpreter.get_signature_runner(INDEXED)
        self._lock = threading.Lock()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """``pctr`` for ``feeds`` (the ``indexed`` inputs as numpy arrays)."""
        with self._lock:
            return np.array(self._runner(**feeds)[OUTPUT], dtype=np.float32).reshape(-1)


def convert(folder: Path) -> bytes:
    """The SavedModel's ``indexed`` signature in ``folder`` as a TFLite flatbuffer, builtin ops
    only (no TF-op fallback: that would bring TensorFlow's executor back)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder), signature_keys=[INDEXED])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def planted_cases(
    requests: Sequence[Mapping[str, np.ndarray]],
    to_indexed: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    candidate_strings: Sequence[str],
) -> dict[str, dict[str, np.ndarray]]:
    """The check's ``indexed`` rows from ``requests`` (one request each: shared inputs ``[1]``,
    candidate inputs ``[N]``, strings as bytes): each as sent, with every third candidate's
    strings replaced by :data:`OOV_VALUE` (OOV rows of every candidate feature), with 12
    all-zero padding rows appended, and all of them in the micro-batcher's form (each request's
    shared rows repeated per candidate, the requests one after the other).

    ``to_indexed`` turns one request's raw inputs into ``indexed`` feeds."""
    cases: dict[str, dict[str, np.ndarray]] = {}
    batch: list[dict[str, np.ndarray]] = []
    for i, request in enumerate(requests):
        oov = dict(request)
        for name in candidate_strings:
            values = np.asarray(oov[name]).astype(object)
            values[::3] = OOV_VALUE
            oov[name] = values
        for label, inputs in (("as_sent", request), ("oov", oov)):
            feeds = to_indexed(inputs)
            cases[f"r{i}_{label}"] = feeds
            n = max(len(v) for v in feeds.values())
            rows = {k: np.repeat(v, n, axis=0) if len(v) == 1 else v for k, v in feeds.items()}
            batch.append(rows)
        padded = {
            k: np.concatenate([v, np.zeros((12, *v.shape[1:]), v.dtype)]) if len(v) > 1 else v
            for k, v in cases[f"r{i}_oov"].items()
        }
        cases[f"r{i}_padded"] = padded
    if batch:
        cases["batched"] = {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}
    return cases


def save_cases(path: Path, cases: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    arrays = {f"{case}/{name}": v for case, feeds in cases.items() for name, v in feeds.items()}
    np.savez(path, **arrays)  # type: ignore[arg-type]


def load_cases(path: Path) -> dict[str, dict[str, np.ndarray]]:
    cases: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as stored:
        for key in stored.files:
            case, name = key.split("/", 1)
            cases.setdefault(case, {})[name] = stored[key]
    return cases


def check_lite(
    lite: LiteCall,
    saved_indexed: Callable[..., Any],
    cases: Mapping[str, Mapping[str, np.ndarray]],
) -> float:
    """The largest difference between ``lite`` and the SavedModel's ``indexed`` function on the
    planted ``cases``.

    Raises:
        ValueError: a case's scores differ by more than :data:`TOLERANCE`, are not finite, or
            the two disagree on the number of rows (the message names the case).
    """
    if not cases:
        raise ValueError("no planted rows to check the TFLite model on")
    worst = 0.0
    for case, feeds in cases.items():
        expected = saved_indexed(**{k: tf.constant(v) for k, v in feeds.items()})[OUTPUT].numpy()
        got = lite(feeds)
        if got.shape != expected.shape or not np.all(np.isfinite(got)):
            raise ValueError(
                f"TFLite case {case!r}: {got.shape} values (finite: "
                f"{bool(np.all(np.isfinite(got)))}), the SavedModel {expected.shape}"
            )
        diff = float(np.max(np.abs(got - expected))) if len(got) else 0.0
        if diff > TOLERANCE:
            raise ValueError(
                f"TFLite case {case!r} differs from the SavedModel by {diff:.2e} (> {TOLERANCE:g})"
            )
        worst = max(worst, diff)
    return worst


def write_lite(
    folder: Path,
    loaded: Any,
    requests: Sequence[Mapping[str, np.ndarray]],
    to_indexed: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    candidate_strings: Sequence[str],
) -> dict[str, Any]:
    """Convert the SavedModel in ``folder`` (``loaded``: the same, reloaded), check it on
    planted rows and write :data:`LITE_FILE` and :data:`CHECK_FILE` there; return the manifest
    entry. A conversion that fails or a model that disagrees leaves no file and an entry saying
    why (the SavedModel still serves)."""
    started = time.perf_counter()
    cases = planted_cases(requests, to_indexed, candidate_strings)
    try:
        blob = convert(folder)
        (folder / LITE_FILE).write_bytes(blob)
        worst = check_lite(LiteCall(folder / LITE_FILE), loaded.signatures[INDEXED], cases)
    except Exception as exc:  # unsupported op, converter failure, disagreement: not published
        (folder / LITE_FILE).unlink(missing_ok=True)
        return {"refused": f"{type(exc).__name__}: {exc}"[:500]}
    save_cases(folder / CHECK_FILE, cases)
    return {
        "file": LITE_FILE,
        "signature": INDEXED,
        "check_file": CHECK_FILE,
        "cases": sorted(cases),
        "max_abs_difference": worst,
        "bytes": len(blob),
        "seconds": round(time.perf_counter() - started, 2),
    }
