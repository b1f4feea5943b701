"""Weight-table rows the fit never trained as themselves, served as the table's average row.

A vocabulary index with no fit rows keeps its initial value (or, in the wide part, 0), which is
not neutral: such values are served as the row-weighted mean of the values the fit saw.

An OOV index is trained, on the values below the vocabulary's ``min_count``. For an ad those are
the ads the serving policy itself barely showed, not what a new ad is: in every generated world
the served ranker predicted D's new ads at 0.31-0.48 of their clicks while the peers predicted
0.76-1.10 (docs/history/model-quality.md, session 20). So the OOV rows of the ad's own features
are served as the mean too. A user's rarity is the user's own (a light user, like a new one): on
TalkingData, where most of D's users are new, serving every feature's OOV row as the mean
over-predicted D (calibration 1.34 [1.04, 1.76], AUC -0.0054), so other roles keep their trained
OOV rows.

The rule is worked out from the fit rows once (:class:`ServedMean`) and applied to the wide
part's solution per ``C`` (:mod:`models.ranker.wide`) and the window FM's tables once fitted
(:func:`models.ranker.train.fit_window_fm`). Not to the network's embeddings: there the mean row
shifted D's level on a planted folder with sampled negatives (calibration 1.03 to 1.11) for
nothing in the generated worlds (new-ad calibration +0.013 at demo, +0.001 at medium).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np


@dataclass(frozen=True)
class ServedMean:
    """Which rows of one weight table are served as the table's row-weighted mean row, and over
    which rows that mean is taken: fixed by the fit rows alone, so it is worked out once per fit
    (at 10M, redoing it per ``C`` of the wide grid cost more than the solves themselves)."""

    replaced: np.ndarray  # bool per value: served as the mean
    basis: np.ndarray  # bool per value: the values the mean is taken over
    rows: np.ndarray  # fit rows per value: the mean's weights

    def apply(self, weights: np.ndarray) -> np.ndarray:
        """``weights`` (one scalar or one vector per value) with the replaced values set to the
        basis values' row-weighted mean."""
        if not self.replaced.any() or not self.basis.any():
            return weights
        out = weights.copy()
        out[self.replaced] = np.average(weights[self.basis], axis=0, weights=self.rows[self.basis])
        return out


def unseen_mean(rows: np.ndarray, oov: int = 0) -> ServedMean:
    """Values absent from the fit rows (``rows`` per value), and the first ``oov`` indices (a
    lookup's OOV buckets, whatever rare values trained them), are served as the mean of the
    others.

    Why the absent ones: L2 spreads part of the intercept over each feature's weights, so a value
    the fit never saw (weight 0) is not neutral. Medium world, D = 2024-01-08 (a Monday), ranker
    days Saturday and Sunday: D's ``ctx__dow`` had no trained weight and the ranker predicted
    1.358x D's clicks; scored as a Saturday / Sunday, 1.054x / 1.023x.
    """
    counted = np.asarray(rows)
    own = counted > 0
    own[:oov] = False
    return ServedMean(~own, own, counted)


def oov_indices(logit_model: keras.Model, feature: str) -> int:
    """How many OOV indices the ranker's lookup of ``feature`` has (they come first)."""
    return int(logit_model.get_layer(f"lookup__{feature}").num_oov_indices)


def serve_unseen_as_mean(
    logit_model: keras.Model,
    tables: Mapping[str, keras.layers.Layer],
    counts: Mapping[str, Any],
    oov_as_mean: Collection[str] = (),
) -> int:
    """Set the unseen rows of each table (feature name → ``Embedding`` layer), and the OOV rows
    of the features in ``oov_as_mean``, to the row-weighted mean of the others, ``counts[feature]``
    being the fit's rows per index (as the log has them: with sampled negatives, each one
    weighted by the inverse of its rate). Returns the number of rows replaced."""
    replaced = 0
    for feature, layer in tables.items():
        oov = oov_indices(logit_model, feature) if feature in oov_as_mean else 0
        served = unseen_mean(np.asarray(counts[feature]), oov)
        (weights,) = layer.get_weights()
        layer.set_weights([served.apply(np.asarray(weights))])
        replaced += int(served.replaced.sum()) if served.basis.any() else 0
    return replaced
