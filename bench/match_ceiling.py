"""How far a ranker can get when it knows the latent match only through the fields (issue 10).

The generated world's latent match is ``(user factor + placement factor) · ad factor``; each
factor is a mix of per-field tastes (a user's profile, a placement's page type and slot, an ad's
category and brand) plus a per-entity part no field shows. The ranker's crosses
(``ranker.crosses``) can carry the per-field part only. This bench replaces each factor by its
least-squares projection on its fields' one-hot values and ranks every live ad of D for a seeded
sample of D's requests (the sample of ``bench/slate_gap.py``) by the true ad quality and price
taste plus that projected match, then values the top-10 slates with the true click
probabilities: the ceiling of a scorer that estimates quality perfectly and the match from the
fields alone. Mixed rows (true user x projected ad, projected user x true ad) show which side's
per-entity part is worth more.

The two-tower rows ask the same of the retrieval stage's score ``user·ad + context·ad`` from D's
published embeddings, the ranker's only carrier of the per-entity match: quality and price exact
plus ``β`` times that score, alone and beside the fields' match, with ``β`` the best of a grid on
these very requests (an optimistic ceiling of what the score carries, not a fitted model).

Usage (needs D's features folder and the world's truth)::

    python -m bench.match_ceiling --root var/bench-quality/medium --date 2024-01-08
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import lsqr

from bench.common import (
    add_generated_state_arguments,
    generated_world,
    print_table,
    write_json,
)


def project(factor: np.ndarray, fields: Sequence[np.ndarray]) -> np.ndarray:
    """``factor`` (``[n, d]``) replaced by its least-squares fit on the one-hot values of
    ``fields`` (additive, with an intercept): the part of each row the fields explain."""
    blocks = []
    for values in fields:
        index = np.unique(values, return_inverse=True)[1]
        blocks.append(sp.csr_matrix((np.ones(len(index)), (np.arange(len(index)), index))))
    design = sp.hstack(blocks).tocsr()
    mean = factor.mean(axis=0)
    columns = [
        design @ lsqr(design, factor[:, j] - mean[j], atol=1e-8, btol=1e-8, iter_lim=3000)[0]
        for j in range(factor.shape[1])
    ]
    return mean + np.column_stack(columns)


def two_tower_scores(
    root: Path, date: dt.date, world: Any, requests: pd.DataFrame, live: np.ndarray
) -> np.ndarray:
    """``user·ad + context·ad`` of D's published embeddings for every (request, live ad), as
    serving's candidate stage scores them (unknown users and placements get the fallbacks)."""
    from candidates.store import read_embeddings
    from deepclick import layout
    from deepclick.layout import version_for
    from deepclick.publish import resolve
    from models.ranker.similarity import EmbeddingSimilarity

    folder = resolve(layout.artifacts(root) / "embeddings", version_for(date), what="embeddings")
    similarity = EmbeddingSimilarity(read_embeddings(folder))
    ad_ids = np.asarray(world.ad_ids)[live]
    out = np.empty((len(requests), len(live)), dtype=np.float32)
    users = requests["user_id"].to_numpy(dtype=str)
    placements = requests["placement_id"].to_numpy(dtype=str)
    for row, (user_id, placement_id) in enumerate(zip(users, placements, strict=True)):
        user_ad, context_ad = similarity.scores(
            np.full(len(live), user_id), np.full(len(live), placement_id), ad_ids
        )
        out[row] = user_ad + context_ad
    return out


@dataclass
class MatchCeiling:
    """D's sampled requests over every live ad, scored by the true quality and price taste
    plus a match term, and the fields' projections of the world's factors."""

    world: Any
    requests: pd.DataFrame
    live: np.ndarray
    users: np.ndarray
    placements: np.ndarray
    base: np.ndarray
    oracle: np.ndarray
    fields: dict[str, np.ndarray]
    explained: dict[str, float]

    def slates(
        self, context: np.ndarray | None, ads: np.ndarray | None, extra: np.ndarray | None = None
    ) -> np.ndarray:
        """True click probabilities of the top-10 of every live ad scored by the true quality
        and price taste plus ``scale · context · ads`` (no match term when ``context`` is None)
        plus ``extra`` (``[requests, live ads]``)."""
        from lifecycle.replay import SLOTS, true_slates

        world, live = self.world, self.live
        score = self.base if context is None else self.base + world.scale * (context @ ads[live].T)
        if extra is not None:
            score = score + extra
        top = np.argsort(-score, axis=1)[:, :SLOTS]
        return true_slates(world, self.requests, [world.ad_ids[live[t]].tolist() for t in top])

    def field_match(self) -> tuple[np.ndarray, np.ndarray]:
        """The query and ad sides of the match as the fields carry it (what crosses can)."""
        query = self.fields["user"][self.users] + self.fields["placement"][self.placements]
        return query, self.fields["ad"]

    def tower_systems(
        self, towers: np.ndarray, betas: Sequence[float]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Slates of quality and price plus ``β·towers`` (a ``[requests, live ads]`` score),
        alone and beside the fields' match, each at the best ``β`` of ``betas`` on these very
        requests (an optimistic ceiling of what the score carries)."""

        def best(context: np.ndarray | None, ads: np.ndarray | None) -> tuple[float, np.ndarray]:
            tried = {beta: self.slates(context, ads, beta * towers) for beta in betas}
            beta = max(tried, key=lambda b: float(tried[b].sum()))
            return beta, tried[beta]

        beta_alone, alone = best(None, None)
        beta_fields, beside = best(*self.field_match())
        return (
            {TOWERS_ALONE: alone, TOWERS_BESIDE_FIELDS: beside},
            {TOWERS_ALONE: beta_alone, TOWERS_BESIDE_FIELDS: beta_fields},
        )


def learned_slates(ceiling: MatchCeiling, root: Path, date: dt.date) -> np.ndarray:
    """Slates of the world's equation with every field's effect known and every entity's own
    part (bias and factor) learned from the training window's clicks
    (``bench.auc_ceiling.learned_parts``): the slate a near-Bayes ranker of these rows serves."""
    from bench.auc_ceiling import (
        ROW_COLUMNS,
        SIDES,
        field_parts,
        learned_parts,
        rows_of,
        true_parts,
    )
    from deepclick import layout

    world = ceiling.world
    training = pd.read_parquet(
        layout.DayLayout(root, date).features / "training" / "ranking", columns=ROW_COLUMNS
    )
    truth, fields = true_parts(world), field_parts(world)
    learned = learned_parts(world, truth, fields, rows_of(world, training), SIDES, rounds=2)
    live = ceiling.live
    context = learned.user_factor[ceiling.users] + learned.placement_factor[ceiling.placements]
    quality = (learned.ad_bias - world.ad_quality)[live][None, :]  # replaces the true quality
    return ceiling.slates(context, learned.ad_factor, quality)


LEARNED = "equation known, every own part learned from the window (near-Bayes)"
TOWERS_ALONE = "two-tower score (best beta)"
TOWERS_BESIDE_FIELDS = "fields x category, brand + two-tower score (best beta)"


def match_ceiling(world: Any, eval_rows: pd.DataFrame, date: dt.date, requests: int, seed: int):
    """The :class:`MatchCeiling` of a seeded sample of ``requests`` of D's impressions (the
    sample of ``bench/slate_gap.py``)."""
    from lifecycle.replay import oracle_slates, sample_requests
    from pipelines.simulate import index_of, live_ads

    sample = sample_requests(eval_rows, requests, seed=seed)
    user = world.user_factor.astype(float)
    place = world.placement_factor.astype(float)
    ad = world.ad_factor.astype(float)
    fields = {
        "user": project(user, world.user_profile),
        "placement": project(place, [world.placement_page, world.placement_slot]),
        "ad": project(ad, [world.ad_cate, world.ad_brand]),
    }
    explained = {
        name: round(float(1 - ((f - fit) ** 2).sum() / ((f - f.mean(axis=0)) ** 2).sum()), 3)
        for name, f, fit in (
            ("user factor by profile", user, fields["user"]),
            ("placement factor by page type, slot", place, fields["placement"]),
            ("ad factor by category, brand", ad, fields["ad"]),
        )
    }
    u = index_of(world, "user", sample["user_id"].to_numpy(dtype=str))
    p = index_of(world, "placement", sample["placement_id"].to_numpy(dtype=str))
    live = live_ads(world, date)
    taste = world.user_pvalue[u].astype(float) - 2.0
    base = world.ad_quality[live][None, :] + (
        world.price_affinity * taste[:, None] * world.ad_log_price_z[live][None, :]
    )
    _, oracle_p = oracle_slates(world, sample, date)
    return MatchCeiling(world, sample, live, u, p, base, oracle_p, fields, explained)


def share_rows(
    ceiling: MatchCeiling, systems: dict[str, np.ndarray], seed: int
) -> list[dict[str, Any]]:
    """Each system's top-10 slate as a share of the oracle with its bootstrap 95% interval."""
    from lifecycle.replay import SLOTS
    from models.evaluation.replay import ORACLE, replay_report

    report = replay_report(
        {ORACLE: ceiling.oracle, **systems}, ks=(SLOTS,), bootstrap=500, seed=seed
    )
    rows = []
    for name in systems:
        top = report["systems"][name][f"top_{SLOTS}"]
        low, high = top["share_of_oracle_ci95"]
        rows.append(
            {
                "match known as": name,
                "of_oracle": round(top["share_of_oracle"], 3),
                "ci_low": round(low, 3),
                "ci_high": round(high, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from deepclick import layout

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generated_state_arguments(parser)
    parser.add_argument("--requests", type=int, default=300, help="replayed requests of D")
    parser.add_argument("--seed", type=int, default=7, help="request sample and bootstrap seed")
    parser.add_argument(
        "--betas",
        default="0.25,0.5,1,2,4",
        help="comma-separated weights of the two-tower score tried (the best is reported)",
    )
    args = parser.parse_args(argv)

    date = dt.date.fromisoformat(args.date)
    world = generated_world(args.root, args.dataset, "match_ceiling")
    eval_rows = pd.read_parquet(layout.DayLayout(args.root, date).eval_rows)
    ceiling = match_ceiling(world, eval_rows, date, args.requests, args.seed)
    print(f"variance explained by the fields: {ceiling.explained}")

    user, place, ad = world.user_factor, world.placement_factor, world.ad_factor
    u, p = ceiling.users, ceiling.placements
    fields = ceiling.fields
    scorers = {
        "the true factors (the oracle)": (user[u] + place[p], ad),
        "profile, page type, slot x category, brand (what crosses carry)": ceiling.field_match(),
        "true user + placement x category, brand": (user[u] + place[p], fields["ad"]),
        "profile, page type, slot x true ad factor": (
            fields["user"][u] + fields["placement"][p],
            ad,
        ),
        "not at all (quality + price)": (None, None),
    }
    systems = {name: ceiling.slates(*parts) for name, parts in scorers.items()}
    systems[LEARNED] = learned_slates(ceiling, args.root, date)
    towers = two_tower_scores(args.root, date, world, ceiling.requests, ceiling.live)
    with_towers, betas = ceiling.tower_systems(towers, [float(b) for b in args.betas.split(",")])
    systems.update(with_towers)
    print(f"two-tower score weight (best of --betas): {betas}")
    rows = share_rows(ceiling, systems, args.seed)
    print_table(
        f"match ceiling on {args.date}: {len(ceiling.requests)} requests x "
        f"{len(ceiling.live)} live ads",
        rows,
    )
    path = write_json(
        f"match_ceiling-{args.root.name}-{date:%Y%m%d}",
        {
            "root": str(args.root),
            "date": args.date,
            "requests": len(ceiling.requests),
            "explained": ceiling.explained,
            "two_tower_beta": betas,
            "rows": rows,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
