"""Create a compiled Keras model's training state before ``fit``, so its step is traced once.

Keras 3 on TensorFlow, without a distribution strategy, defers building the model, the
optimizer's slots and the compiled loss and metrics to the first trace of the train step. A
``tf.function`` that creates variables while it traces is traced a second time without them, so
every fit built its whole train-step graph (forward, backward, one Adam update per variable) twice.
On the small worlds of the daily run's tests and the demo that graph, not the arithmetic, is most
of a fit: the towers of ``tests/test_daily.py``'s world took 16-18 s of CPU with 1 or 3 epochs
alike, and 9-12 s with this.

The variables are created by one eager pass over a couple of rows (``training=False``: no dropout
or other random draw is consumed) and ``optimizer.build``; the metrics that pass touched are reset.
Nothing is read from the training dataset, whose seeded shuffle would advance; so the trained
weights are the same as without it (``tests/test_fitting.py``).

The training datasets themselves come from :func:`shuffled_batches`, for the towers and the
ranker alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

SAMPLE_ROWS = 2
"""Rows of the eager building pass: any batch builds the same variables."""


def build_before_fit(
    model: keras.Model, inputs: Mapping[str, Any], labels: np.ndarray | None = None
) -> None:
    """Create every variable ``model.fit`` would create on its first step.

    Args:
        model: a compiled model.
        inputs: model inputs by name (arrays or tensors); only the first rows are used.
        labels: the targets of those rows, when the compiled loss and metrics read labels.
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"model {model.name!r} is not compiled: compile it before building it")
    x = {name: values[:SAMPLE_ROWS] for name, values in inputs.items()}
    y_pred = model(x, training=False)
    if labels is not None:
        y = np.asarray(labels[:SAMPLE_ROWS], dtype=np.float32)
        model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        model.compute_metrics(x, y, y_pred)
        model.reset_metrics()
    model.optimizer.build(model.trainable_variables)


def shuffled_batches(
    columns: Mapping[str, Any],
    batch_size: int,
    seed: int,
    *,
    labels: np.ndarray | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of ``columns`` (name → one value per row), or of ``(columns, labels)``, in a seeded
    order drawn anew each epoch.

    Row indices are shuffled and batched, then every column is gathered a batch at a time. Why
    not shuffle the rows themselves: slicing a dict of string columns row by row is several
    times slower than the model step, and a shuffle buffer keeps each row's tensors apart, about
    150 bytes per scalar feature; at 10M impressions the ranker's fits held several GB each and
    the kernel's OOM killer ended the stage at 19.4 GB. The shuffle's draws do not depend on
    what it shuffles, so the order is the one a buffer of the rows would give
    (``tests/test_ranker_training_memory.py``).
    """
    tensors = {name: tf.convert_to_tensor(values) for name, values in columns.items()}
    targets = None if labels is None else tf.convert_to_tensor(labels)
    rows = len(next(iter(columns.values()))) if labels is None else len(labels)

    def gather(index: tf.Tensor) -> Any:
        batch = {name: tf.gather(tensor, index) for name, tensor in tensors.items()}
        return batch if targets is None else (batch, tf.gather(targets, index))

    return (
        tf.data.Dataset.range(rows)
        .shuffle(rows, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=drop_remainder)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
