"""Export the towers as SavedModels and load them back as numpy/pandas callables.

One SavedModel per tower (``user``, ``context``, ``ad`` and, when the spec has request-time
features, ``time``). Each ``serving_default`` signature takes the raw feature values of its role
— one ``[batch]`` tensor per feature, strings for categorical and float32 for numeric, named by
the feature — and returns ``embedding`` float32 ``[batch, dim]``. Preprocessing (vocabulary lookup
with hashed OOV buckets, standardisation) is inside the graph, so the Spark embed job, serving's
cold-start path and training share one mapping. The exported context vector already contains the
mean time vector and the time tower is centred (``model.py``), so
``user·ad + context·ad`` is the score the embeddings publish and ``+ time·ad`` the exact one.

``tower.json`` beside ``saved_model.pb`` records the role, inputs, dim and feature-spec version
for manifests; TensorFlow ignores it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from models.export_archive import write_traced_once
from models.two_tower.preprocessing import input_array
from models.two_tower.train import EMBED_BATCH, TrainedTowers

SIGNATURE = "serving_default"
OUTPUT = "embedding"
TOWER_FILE = "tower.json"


def export_towers(trained: TrainedTowers, out_dir: Path) -> dict[str, Path]:
    """Write ``<out_dir>/<role>/`` SavedModels for every tower; return ``{role: path}``.

    Raises:
        FileExistsError: a tower folder already exists and is not empty (export into a fresh
            staging folder; publishing is the caller's job).
    """
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for role in trained.roles:
        path = out_dir / role
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} is not empty: export towers into a fresh folder")
        tower = trained.tower(role)
        archive = keras.export.ExportArchive()
        archive.track(tower)
        archive.add_endpoint(
            name=SIGNATURE,
            fn=_named_output(trained.serving_function(role)),
            input_signature=[tower.input_signature()],
        )
        write_traced_once(archive, path)
        description = {
            "role": role,
            "dim": trained.dim,
            "signature": SIGNATURE,
            "output": OUTPUT,
            "feature_spec_version": trained.spec.version,
            "inputs": [
                {"name": f.name, "kind": f.kind, "dtype": "string" if f.kind == "categorical"
                 else "float32"}
                for f in tower.features
            ],
            "offset": trained.offsets[role].tolist(),
        }  # fmt: skip
        (path / TOWER_FILE).write_text(json.dumps(description, indent=2) + "\n")
        paths[role] = path
    return paths


def _named_output(
    embed: Callable[[Mapping[str, tf.Tensor]], tf.Tensor],
) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The endpoint function: one argument (the feature dict), output named ``embedding``."""

    def serve(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {OUTPUT: embed(inputs)}

    return serve


class LoadedTower:
    """An exported tower as a function: raw columns in, float32 ``[n, dim]`` vectors out.

    Load it once per process (or per Spark partition) and call it on many rows; calls are
    batched internally in chunks of ``EMBED_BATCH`` rows.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._model = tf.saved_model.load(str(self.path))
        if SIGNATURE not in self._model.signatures:
            raise ValueError(f"{self.path} has no {SIGNATURE} signature: is it an exported tower?")
        self._fn = self._model.signatures[SIGNATURE]
        _, specs = self._fn.structured_input_signature
        description = self.path / TOWER_FILE
        meta = json.loads(description.read_text()) if description.is_file() else {}
        order = [entry["name"] for entry in meta.get("inputs", []) if entry["name"] in specs]
        order += sorted(set(specs) - set(order))
        self.inputs: dict[str, tf.DType] = {name: specs[name].dtype for name in order}
        self.role: str | None = meta.get("role")
        self.dim: int = int(meta.get("dim") or self._fn.structured_outputs[OUTPUT].shape[-1])

    @property
    def feature_names(self) -> list[str]:
        """The columns a call needs (the tower's raw features)."""
        return list(self.inputs)

    def fallback(self) -> np.ndarray:
        """float32 ``[dim]``: the vector of an entity with an unseen id and no known features —
        a candidate for the ``fallback_<entity>.npy`` of the embeddings contract."""
        return self({}, fill_missing=True, rows=1)[0]

    def __call__(
        self,
        frame: pd.DataFrame | Mapping[str, object],
        *,
        fill_missing: bool = False,
        rows: int | None = None,
    ) -> np.ndarray:
        """Vectors for the rows of ``frame`` (extra columns are ignored).

        Args:
            frame: a DataFrame (or dict of equal-length columns) with the tower's raw features.
            fill_missing: treat absent columns as missing values (the spec defaults) instead of
                failing — for cold-start requests that carry only some features.
            rows: the number of rows, needed only when no column of the tower is given.

        Raises:
            KeyError: a needed column is absent and ``fill_missing`` is false.
        """
        absent = [name for name in self.inputs if name not in frame]
        if absent and not fill_missing:
            raise KeyError(
                f"tower {self.role or self.path}: columns {', '.join(absent)} are missing "
                f"(needs {', '.join(self.inputs)}; pass fill_missing=True for cold start)"
            )
        if rows is not None:
            n = rows
        elif isinstance(frame, pd.DataFrame):
            n = len(frame)
        else:
            n = _length(frame, self.inputs)
        columns = {
            name: input_array(frame[name] if name in frame else [None] * n, dtype)
            for name, dtype in self.inputs.items()
        }
        parts = [
            self._fn(**{k: tf.constant(v[i : i + EMBED_BATCH]) for k, v in columns.items()})[
                OUTPUT
            ].numpy()
            for i in range(0, n, EMBED_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def _length(frame: Mapping[str, object], names: Mapping[str, object]) -> int:
    present = [name for name in names if name in frame]
    if not present:
        raise ValueError(
            "cannot tell the number of rows: no column of the tower is present (pass rows=)"
        )
    return len(frame[present[0]])  # type: ignore[arg-type]


def load_tower(path: Path | str) -> LoadedTower:
    """Load an exported tower (``<out_dir>/<role>``) as a numpy/pandas-in, numpy-out callable."""
    return LoadedTower(path)
