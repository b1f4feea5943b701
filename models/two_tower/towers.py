"""The towers of the retrieval model: one Keras layer per role, raw features in, a vector out.

A tower owns the encoders of its features (``preprocessing.py``), concatenates them, runs a small
ReLU MLP and projects to ``embedding_dim``. It takes a dict of raw feature tensors (extra keys
are ignored, so a whole training batch can be handed to every tower) and returns
``[batch, embedding_dim]`` float32.

Which features feed which tower (:func:`tower_features`) follows the additive design of DESIGN.md:

- ``user``: the user-role features (id, profile) — held by ``entities/users``.
- ``context``: the placement id and every context feature that is *not* request-time — all held
  by ``entities/placements``, so the placement vector can be precomputed.
- ``time``: the request-time context features (``ctx__hour``, ``ctx__dow``); a small linear tower
  whose vector is added to the query (see ``model.py`` for how it is folded into the exported
  context vector).
- ``ad``: the ad-role features — id *and* category, brand, campaign, advertiser, price — so an ad
  never clicked (OOV id) still gets a vector from its features.

History features (``<role>__hist_*``) are left out unless ``history_features`` is set (see
:func:`tower_features` for why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from models.feature_spec import Feature, FeatureSpec
from models.two_tower.preprocessing import build_encoder, input_dtype

TOWER_ROLES: tuple[str, ...] = ("user", "context", "time", "ad")
QUERY_ROLES: tuple[str, ...] = ("user", "context", "time")


def tower_features(
    spec: FeatureSpec, role: str, *, exclude: Sequence[str] = (), history: bool = False
) -> list[Feature]:
    """The spec features a tower reads, in spec order.

    Args:
        spec: the feature spec.
        role: one of :data:`TOWER_ROLES`.
        exclude: feature names to leave out.
        history: also read the point-in-time history features (``source == "history"``). Off by
            default: they duplicate what the id embeddings and the logQ correction learn, they
            shift between training (as of each row's day) and embedding (as of the target day),
            and they make a never-clicked ad look like nothing seen in training. On the planted
            set, leaving them out raised recall@50 from 0.59 to 0.66 and put 24/24 new ads
            nearest their own category (7/24 with them).

    Raises:
        ValueError: ``role`` is not one of :data:`TOWER_ROLES`.
    """
    if role not in TOWER_ROLES:
        raise ValueError(f"unknown tower {role!r}: towers are {', '.join(TOWER_ROLES)}")
    spec_role = "context" if role == "time" else role
    chosen = []
    for feature in spec.by_role(spec_role):
        if feature.name in exclude or (feature.source == "history" and not history):
            continue
        if spec_role == "context" and feature.request_time != (role == "time"):
            continue
        chosen.append(feature)
    return chosen


class Tower(keras.layers.Layer):
    """Raw features of one role → ``[batch, embedding_dim]``.

    Args:
        spec: the feature spec (vocabularies are read from its folder).
        role: ``user``, ``context``, ``time`` or ``ad`` (only used to name things).
        features: the features this tower reads (see :func:`tower_features`).
        embedding_dim: size of the output vector.
        feature_embedding_dim: size of each categorical feature's embedding.
        hidden_units: ReLU layers before the output projection (``()`` for a linear tower).
        id_dropout: training-time share of rows whose id embedding is zeroed (cold start).
        seed: seeds the id dropout.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        role: str,
        features: Sequence[Feature],
        *,
        embedding_dim: int,
        feature_embedding_dim: int,
        hidden_units: Sequence[int],
        id_dropout: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(name=kwargs.pop("name", f"{role}_tower"), **kwargs)
        if not features:
            raise ValueError(f"the {role} tower has no features: the spec lists none for it")
        self.role = role
        self.features = list(features)
        self.embedding_dim = embedding_dim
        self.encoders = [
            build_encoder(spec, f, feature_embedding_dim, id_dropout=id_dropout, seed=seed)
            for f in self.features
        ]
        self.hidden = [
            keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")
            for i, units in enumerate(hidden_units)
        ]
        self.output_layer = keras.layers.Dense(embedding_dim, name="projection")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def input_signature(self) -> dict[str, tf.TensorSpec]:
        """One ``[batch]`` tensor per feature: strings for categorical, float32 for numeric."""
        return {f.name: tf.TensorSpec([None], input_dtype(f), name=f.name) for f in self.features}

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        missing = [name for name in self.feature_names if name not in inputs]
        if missing:
            raise KeyError(f"the {self.role} tower needs features {', '.join(missing)}")
        parts = [
            encoder(inputs[f.name], training=training)
            for f, encoder in zip(self.features, self.encoders, strict=True)
        ]
        x = tf.concat(parts, axis=-1)
        for layer in self.hidden:
            x = layer(x)
        return self.output_layer(x)
