"""The two-tower retrieval model: query = user + context (+ time), score = query · ad.

Training uses an in-batch softmax: every clicked (query, ad) pair of a batch is a positive and
the batch's other ads are its negatives. Popular ads appear as in-batch negatives more often than
they would in a full softmax, so the logit of candidate ``j`` is corrected by subtracting
``log q_j`` (the ``ad_log_q`` column of ``training/retrieval``: the ad's share of the clicks,
the probability it is sampled) — the "logQ correction" of Yi et al., RecSys 2019. Logits are
divided by ``temperature`` first; in-batch duplicates of the positive ad are masked so an ad is
never its own negative.

Mixed negative sampling (Yang et al., WWW 2020). In-batch negatives are only ads that were
clicked, so an ad that is rarely or never clicked is almost never pushed down: its score is
unconstrained and it can crowd the top of the candidate list. With ``uniform_negatives`` M > 0,
every batch also scores M ads drawn uniformly from the whole catalogue (``entities/ads``, ads
with no click included). Each candidate's logit is corrected by the log of how often its source
proposes it: ``log(B · q_j)`` for an in-batch ad (B rows, ``q_j`` its click share) and
``log(M / N)`` for a uniform ad (N ads in the catalogue), so the softmax over the union still
estimates the full softmax over the catalogue. A uniform draw of the positive's own ad is masked.

Why the query side is a *sum* of towers: user, placement and time vectors can then be computed
independently (the Spark embed job precomputes users and placements) and added online, so
serving never runs a tower for a known entity.

Request-time context (``ctx__hour``, ``ctx__dow``) cannot be precomputed per placement, so it
gets its own small additive ``time`` tower: query = user + context + time. Because the score is
linear in the query, the expected score over the request-time distribution of the training
clicks is ``(user + context + E[time]) · ad``. :func:`additive_offsets` therefore folds
``E[time]`` into the exported context vector and exports the time tower centred
(``time - E[time]``). The published placement vectors then give exactly
``score = user·ad + context·ad`` — the time-marginal score the embeddings contract (``metric:
dot``) promises — and a server that knows the request time may add ``time·ad`` for the exact
model score (user + context + time is unchanged by the shift).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from models.two_tower.towers import QUERY_ROLES, Tower

MASKED_LOGIT = -1e9


class TwoTowerModel(keras.Model):
    """User, context, optional time and ad towers trained with a logQ-corrected in-batch softmax.

    Args:
        towers: ``user``, ``context``, ``ad`` and optionally ``time`` :class:`Tower` layers.
        temperature: logits are ``query·ad / temperature``.
        candidate_key: the batch column that identifies an ad (to mask in-batch duplicates).
        log_q_key: the batch column holding each ad's log sampling probability.
        catalogue: raw ad-tower features of every ad (``{feature: [N]}``, with the
            ``candidate_key`` column) from which ``uniform_negatives`` are drawn per batch.
        uniform_negatives: M, the uniform negatives per batch (0: in-batch only).
        seed: seeds the uniform draws.
    """

    def __init__(
        self,
        towers: Mapping[str, Tower],
        *,
        temperature: float,
        candidate_key: str = "ad_id",
        log_q_key: str = "ad_log_q",
        catalogue: Mapping[str, np.ndarray] | None = None,
        uniform_negatives: int = 0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        missing = {"user", "context", "ad"} - set(towers)
        if missing:
            raise ValueError(f"a two-tower model needs towers {', '.join(sorted(missing))}")
        self.user_tower = towers["user"]
        self.context_tower = towers["context"]
        self.time_tower = towers.get("time")
        self.ad_tower = towers["ad"]
        self.temperature = float(temperature)
        self.candidate_key = candidate_key
        self.log_q_key = log_q_key
        self.uniform_negatives = int(uniform_negatives)
        self.catalogue: dict[str, tf.Tensor] = {}
        if self.uniform_negatives:
            if not catalogue or candidate_key not in catalogue:
                raise ValueError(
                    f"uniform_negatives={uniform_negatives} needs a catalogue of ad features "
                    f"with the {candidate_key!r} column (entities/ads)"
                )
            self.catalogue = {name: tf.constant(values) for name, values in catalogue.items()}
            self.catalogue_size = len(catalogue[candidate_key])
            self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def towers(self) -> dict[str, Tower]:
        """The towers by role (``time`` only when the spec has request-time features)."""
        towers = {"user": self.user_tower, "context": self.context_tower, "ad": self.ad_tower}
        if self.time_tower is not None:
            towers["time"] = self.time_tower
        return towers

    def query_embedding(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """user + context (+ time): the query vector the training objective scores."""
        towers = self.towers
        return tf.add_n(
            [towers[role](inputs, training=training) for role in QUERY_ROLES if role in towers]
        )

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        return {
            "query": self.query_embedding(inputs, training=training),
            "candidate": self.ad_tower(inputs, training=training),
        }

    def scores(self, inputs: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """``[batch, batch]`` raw scores ``query_i · ad_j`` (no temperature, no correction)."""
        out = self(inputs)
        return tf.matmul(out["query"], out["candidate"], transpose_b=True)

    def compute_loss(
        self,
        x: Mapping[str, tf.Tensor] | None = None,
        y: tf.Tensor | None = None,
        y_pred: Mapping[str, tf.Tensor] | None = None,
        sample_weight: tf.Tensor | None = None,
        training: bool = True,
    ) -> tf.Tensor:
        """Mean softmax cross-entropy of each query against its own clicked ad, the negatives being
        the batch's other ads and, with ``uniform_negatives``, M ads drawn from the catalogue."""
        if x is None or y_pred is None:
            raise ValueError("the two-tower loss needs the batch (x) and the model output")
        query = y_pred["query"]
        batch = tf.shape(query)[0]
        logits = tf.matmul(query, y_pred["candidate"], transpose_b=True) / self.temperature
        log_q = tf.cast(tf.reshape(x[self.log_q_key], [1, -1]), logits.dtype)
        logits -= log_q + tf.math.log(tf.cast(batch, logits.dtype))
        ids = tf.reshape(x[self.candidate_key], [-1])
        same_ad = tf.equal(ids[:, None], ids[None, :])
        duplicate = tf.logical_and(same_ad, tf.logical_not(tf.eye(batch, dtype=tf.bool)))
        logits = tf.where(duplicate, tf.constant(MASKED_LOGIT, logits.dtype), logits)
        if self.uniform_negatives:
            logits = tf.concat([logits, self.uniform_logits(query, ids)], axis=1)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.range(batch), logits=logits)
        )
        return loss + tf.add_n(self.losses) if self.losses else loss

    def uniform_logits(self, query: tf.Tensor, positive_ids: tf.Tensor) -> tf.Tensor:
        """``[batch, M]`` corrected logits of M ads drawn uniformly from the catalogue (the
        positive's own ad masked)."""
        m = self.uniform_negatives
        rows = keras.random.randint((m,), 0, self.catalogue_size, seed=self.seed_generator)
        drawn = {name: tf.gather(values, rows) for name, values in self.catalogue.items()}
        vectors = self.ad_tower(drawn, training=True)
        logits = tf.matmul(query, vectors, transpose_b=True) / self.temperature
        logits -= tf.math.log(tf.cast(m, logits.dtype) / float(self.catalogue_size))
        hit = tf.equal(positive_ids[:, None], drawn[self.candidate_key][None, :])
        return tf.where(hit, tf.constant(MASKED_LOGIT, logits.dtype), logits)


def additive_offsets(
    model: TwoTowerModel, time_inputs: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """Per-tower constant shifts that fold the mean time vector into the context vector.

    Args:
        model: a trained model.
        time_inputs: the request-time features of the training clicks (their empirical
            distribution defines ``E[time]``); ignored when the model has no time tower.

    Returns:
        ``{role: float32 [dim]}``: ``context`` gets ``+E[time]``, ``time`` gets ``-E[time]``,
        the others zero — so the sum of all query towers is unchanged.
    """
    dim = model.ad_tower.embedding_dim
    offsets = {role: np.zeros(dim, np.float32) for role in model.towers}
    if model.time_tower is None or time_inputs is None:
        return offsets
    names = model.time_tower.feature_names
    combos: dict[tuple, int] = {}
    for row in zip(*(np.asarray(time_inputs[n]).tolist() for n in names), strict=True):
        combos[row] = combos.get(row, 0) + 1
    if not combos:
        return offsets
    keys = list(combos)
    weights = np.array([combos[k] for k in keys], np.float64)
    batch = {name: np.array([k[i] for k in keys]) for i, name in enumerate(names)}
    vectors = np.asarray(model.time_tower(batch), np.float64)
    mean = (weights[:, None] * vectors).sum(axis=0) / weights.sum()
    offsets["context"] = mean.astype(np.float32)
    offsets["time"] = (-mean).astype(np.float32)
    return offsets
