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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

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
