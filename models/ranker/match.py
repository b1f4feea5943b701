"""Fitting the ranker's query x ad factor term (``ranker.match_dim``) between the wide part and the
network.

The term (:func:`models.ranker.model._match`) is the dot product of the summed user-and-context
vectors with the summed ad vectors. Like the wide part it reads no two-tower score, so it can
learn from every training day (``wide_days: all``), where the network learns from the ranker days
only. So it is fitted second: the wide part is solved and frozen, then only the match vectors
are trained by Adam on the wide part's rows, with the solved wide logit plus its intercept as a
fixed offset. Then they are frozen too, and the cross and deep parts learn what is left.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from models.evaluation.ranking import logloss
from models.ranker.model import MATCH_PREFIX

WIDE_AND_DEEP = "wide_and_deep"
LOGIT = "logit"


def match_layers(logit_model: keras.Model) -> list[keras.layers.Layer]:
    """The match term's vector tables, or [] when the model has none."""
    return [layer for layer in logit_model.layers if layer.name.startswith(MATCH_PREFIX)]


def wide_and_match(logit_model: keras.Model) -> keras.Model:
    """The model's wide part plus its match term plus the output intercept: the logit the
    network starts from once :func:`models.ranker.wide.fit_wide` has zeroed its output weights.
    Built from the model's own layers, so training it trains the model's match vectors."""
    _, wide, match = logit_model.get_layer(WIDE_AND_DEEP).input
    intercept = float(logit_model.get_layer(LOGIT).get_weights()[1][0])
    return keras.Model(logit_model.input, ops.add(ops.add(wide, match), intercept))


def _logits(model: keras.Model, data: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    for inputs, label in data:
        logits.append(np.asarray(model(inputs, training=False)).reshape(-1))
        labels.append(np.asarray(label).reshape(-1))
    return np.concatenate(logits), np.concatenate(labels)


def fit_match(
    logit_model: keras.Model,
    data: tf.data.Dataset,
    *,
    epochs: int,
    learning_rate: float,
    held: tuple[tf.data.Dataset, float] | None = None,
    verbose: int = 0,
) -> dict[str, float]:
    """Train the match vectors of ``logit_model`` on ``data`` (batched ``(inputs, label)``,
    shuffled) with the solved wide part as offset, then freeze them.

    With ``held`` (batched held-out rows and the sampling correction of the fit rows), the
    held-out log loss of wide part alone and of wide part plus match term are returned, so a
    run says whether the term carried to rows it did not fit on.

    Returns {} when the model has no match term.
    """
    tables = match_layers(logit_model)
    if not tables:
        return {}
    offset_model = wide_and_match(logit_model)
    metrics: dict[str, float] = {}

    def held_loss() -> float:
        assert held is not None
        logits, labels = _logits(offset_model, held[0])
        return logloss(labels, 1.0 / (1.0 + np.exp(-(logits + held[1]))))

    if held is not None:
        saved = [table.get_weights() for table in tables]
        for table, weights in zip(tables, saved, strict=True):
            table.set_weights([np.zeros_like(w) for w in weights])
        metrics["match_holdout_logloss_before"] = held_loss()
        for table, weights in zip(tables, saved, strict=True):
            table.set_weights(weights)
    offset_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    history = offset_model.fit(data, epochs=epochs, shuffle=False, verbose=verbose)
    metrics["match_train_loss"] = float(history.history["loss"][-1])
    if held is not None:
        metrics["match_holdout_logloss"] = held_loss()
    for table in tables:
        table.trainable = False
    return metrics
