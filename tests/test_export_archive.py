"""An ExportArchive written with every endpoint traced once (models/export_archive.py) is the
SavedModel Keras's own ``write_out`` would write: same signatures, variables and lookup table,
same outputs; Keras's ``write_out`` traces each endpoint twice."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from models.export_archive import write_traced_once


def _archive() -> tuple[keras.export.ExportArchive, dict[str, tf.types.experimental.Function]]:
    """A string lookup and a dense layer (a variable and a lookup table) behind two endpoints."""
    lookup = keras.layers.StringLookup(vocabulary=["a", "b", "c"], output_mode="one_hot")
    dense = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant([[0], [1], [2], [3]])
    )
    strings = keras.Input(shape=(), dtype="string")
    model = keras.Model(strings, dense(lookup(strings)))
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = [tf.TensorSpec([None], tf.string)]
    endpoints = {
        "score": archive.add_endpoint("score", lambda x: {"y": model(x)}, spec),
        "twice": archive.add_endpoint("twice", lambda x: {"y": 2.0 * model(x)}, spec),
    }
    return archive, endpoints


def test_each_endpoint_is_traced_once_and_scores_as_keras_writes_it(tmp_path: Path) -> None:
    ours, traced = _archive()
    write_traced_once(ours, tmp_path / "once")
    theirs, keras_traced = _archive()
    theirs.write_out(str(tmp_path / "keras"), verbose=False)

    assert {name: f.experimental_get_tracing_count() for name, f in traced.items()} == {
        "score": 1,
        "twice": 1,
    }
    assert {f.experimental_get_tracing_count() for f in keras_traced.values()} == {2}

    once = tf.saved_model.load(str(tmp_path / "once"))
    reference = tf.saved_model.load(str(tmp_path / "keras"))
    assert (
        set(once.signatures) == set(reference.signatures) == {"score", "twice", "serving_default"}
    )
    x = tf.constant(["a", "c", "unseen", "b"])
    for name in ("score", "twice", "serving_default"):
        got = once.signatures[name](x=x)["y"].numpy().ravel()
        np.testing.assert_array_equal(got, reference.signatures[name](x=x)["y"].numpy().ravel())
    np.testing.assert_array_equal(once.signatures["score"](x=x)["y"].numpy().ravel(), [1, 3, 0, 2])
