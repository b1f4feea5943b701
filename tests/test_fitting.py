"""models/fitting.py: a compiled model's variables created before fit, so its step is traced once
and the trained weights do not change."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.fitting import build_before_fit


@keras.saving.register_keras_serializable(package="deepclick_tests")
class CountedDense(keras.layers.Dense):
    """A Dense layer that counts the graphs its call is traced into (eager calls not counted)."""

    traces = 0

    def call(self, inputs):
        if not tf.executing_eagerly():
            CountedDense.traces += 1
        return super().call(inputs)


def fitted(prebuild: bool) -> tuple[list[np.ndarray], int]:
    """Weights after two seeded epochs, and how often the train step's graph was built."""
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(64, 3)).astype(np.float32)}
    y = (x["a"][:, 0] > 0).astype(np.float32)
    inputs = keras.Input((3,), name="a")
    hidden = CountedDense(4, activation="relu")(inputs)
    model = keras.Model({"a": inputs}, keras.layers.Dense(1)(hidden))
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(64, seed=1, reshuffle_each_iteration=True)
        .batch(16)
    )
    CountedDense.traces = 0
    if prebuild:
        build_before_fit(model, x, y)
    model.fit(data, epochs=2, verbose=0, shuffle=False)
    return [w.numpy() for w in model.weights], CountedDense.traces


def test_the_step_is_traced_once_and_the_weights_do_not_change() -> None:
    plain, plain_traces = fitted(prebuild=False)
    built, built_traces = fitted(prebuild=True)
    assert plain_traces == 2  # Keras created the optimizer's slots while tracing: traced again
    assert built_traces == 1
    assert len(plain) == len(built)
    for a, b in zip(plain, built, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_uncompiled_model_is_named() -> None:
    inputs = keras.Input((2,), name="a")
    model = keras.Model({"a": inputs}, keras.layers.Dense(1)(inputs), name="plain")
    with pytest.raises(ValueError, match="model 'plain' is not compiled"):
        build_before_fit(model, {"a": np.zeros((2, 2), np.float32)})
