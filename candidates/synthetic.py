"""Synthetic two-tower outputs with a planted structure, for tests, benchmarks and demos.

Real tower outputs are clustered (ads of a category sit together), their norms vary (the ad tower
learns popularity into the norm) and the query is ``user + placement`` with a smaller placement
part. This generator reproduces those traits with a known answer: every user and ad belongs to a
cluster, so tests can check that neighbours come from the user's cluster and benchmarks can run
ANN libraries on vectors shaped like the real ones without training anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticEmbeddings:
    """Tables in the shape :func:`candidates.store.publish_embeddings` takes, plus the truth."""

    tables: dict[str, tuple[np.ndarray, np.ndarray]]
    fallbacks: dict[str, np.ndarray]
    ad_cluster: np.ndarray
    user_cluster: np.ndarray

    def vectors(self, entity: str) -> np.ndarray:
        return self.tables[entity][1]

    def ids(self, entity: str) -> np.ndarray:
        return self.tables[entity][0]


def two_tower_like(
    *,
    n_ads: int,
    n_users: int = 1000,
    n_placements: int = 20,
    dim: int = 64,
    clusters: int = 64,
    spread: float = 0.6,
    norm_sigma: float = 0.3,
    placement_scale: float = 0.3,
    seed: int = 0,
) -> SyntheticEmbeddings:
    """A Gaussian mixture of ``clusters`` unit-scale centres; each vector is its centre plus noise
    of relative size ``spread``; ad norms are scaled by a log-normal of width ``norm_sigma``.
    Small ``spread`` and ``norm_sigma`` give well-separated clusters with obvious answers. Ids are
    ``ad<i>``, ``user<i>``, ``placement<i>`` — unpadded, so their sorted order is not the row
    order, as with real ids. Fallbacks are the mean user and mean placement vectors."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(dim))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) * scale

    def around(cluster: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((cluster.shape[0], dim), dtype=np.float32)
        return centres[cluster] + np.float32(spread) * scale * noise

    ad_cluster = rng.integers(0, clusters, n_ads)
    ads = around(ad_cluster)
    ads *= rng.lognormal(0.0, norm_sigma, (n_ads, 1)).astype(np.float32)
    user_cluster = rng.integers(0, clusters, n_users)
    users = around(user_cluster)
    placements = rng.standard_normal((n_placements, dim), dtype=np.float32)
    placements *= np.float32(placement_scale) * scale

    def named(prefix: str, n: int) -> np.ndarray:
        return np.array([f"{prefix}{i}" for i in range(n)])

    return SyntheticEmbeddings(
        tables={
            "ads": (named("ad", n_ads), ads),
            "users": (named("user", n_users), users),
            "placements": (named("placement", n_placements), placements),
        },
        fallbacks={"user": users.mean(axis=0), "placement": placements.mean(axis=0)},
        ad_cluster=ad_cluster,
        user_cluster=user_cluster,
    )
