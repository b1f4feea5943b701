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

Usage (needs D's features folder and the world's truth)::

    python -m bench.match_ceiling --root var/bench-quality/medium --date 2024-01-08
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.linalg import lsqr

from bench.common import print_table, write_json

SLOTS = 10


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


def main(argv: list[str] | None = None) -> int:
    from deepclick import layout
    from lifecycle.replay import oracle_slates, sample_requests, true_slates
    from pipelines.retrieval_eval import _world
    from pipelines.simulate import index_of, live_ads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="state folder of the dataset")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--dataset", default="marketplace")
    parser.add_argument("--requests", type=int, default=300, help="replayed requests of D")
    parser.add_argument("--seed", type=int, default=7, help="request sample and bootstrap seed")
    args = parser.parse_args(argv)

    date = dt.date.fromisoformat(args.date)
    world = _world(layout.truth_dir(args.root, args.dataset))
    if world is None:
        raise SystemExit(f"no world.npz under {args.root}: match_ceiling needs generated data")
    eval_rows = pd.read_parquet(layout.DayLayout(args.root, date).eval_rows)
    requests = sample_requests(eval_rows, args.requests, seed=args.seed)

    user = world.user_factor.astype(float)
    place = world.placement_factor.astype(float)
    ad = world.ad_factor.astype(float)
    user_fields = project(
        user,
        [
            world.user_gender,
            world.user_age,
            world.user_pvalue,
            world.user_shopping,
            world.user_occupation,
            world.user_segid,
        ],
    )
    place_fields = project(place, [world.placement_page, world.placement_slot])
    ad_fields = project(ad, [world.ad_cate, world.ad_brand])
    explained = {
        name: round(float(1 - ((f - fit) ** 2).sum() / ((f - f.mean(axis=0)) ** 2).sum()), 3)
        for name, f, fit in (
            ("user factor by profile", user, user_fields),
            ("placement factor by page type, slot", place, place_fields),
            ("ad factor by category, brand", ad, ad_fields),
        )
    }
    print(f"variance explained by the fields: {explained}")

    u = index_of(world, "user", requests["user_id"].to_numpy(dtype=str))
    p = index_of(world, "placement", requests["placement_id"].to_numpy(dtype=str))
    live = live_ads(world, date)
    taste = world.user_pvalue[u].astype(float) - 2.0
    base = world.ad_quality[live][None, :] + (
        world.price_affinity * taste[:, None] * world.ad_log_price_z[live][None, :]
    )
    _, oracle_p = oracle_slates(world, requests, date)
    oracle = np.nanmean(oracle_p, axis=1)
    resamples = np.random.default_rng(args.seed).integers(0, len(requests), (500, len(requests)))

    def share(context: np.ndarray, ads: np.ndarray) -> dict[str, float]:
        score = base + world.scale * (context @ ads[live].T)
        top = np.argsort(-score, axis=1)[:, :SLOTS]
        ids = [world.ad_ids[live[t]].tolist() for t in top]
        ctr = np.nanmean(true_slates(world, requests, ids), axis=1)
        boot = np.array([ctr[i].mean() / oracle[i].mean() for i in resamples])
        return {
            "of_oracle": round(float(ctr.mean() / oracle.mean()), 3),
            "ci_low": round(float(np.quantile(boot, 0.025)), 3),
            "ci_high": round(float(np.quantile(boot, 0.975)), 3),
        }

    rows = [
        {"match known as": "the true factors (the oracle)", **share(user[u] + place[p], ad)},
        {
            "match known as": "profile, page type, slot x category, brand (what crosses carry)",
            **share(user_fields[u] + place_fields[p], ad_fields),
        },
        {
            "match known as": "true user + placement x category, brand",
            **share(user[u] + place[p], ad_fields),
        },
        {
            "match known as": "profile, page type, slot x true ad factor",
            **share(user_fields[u] + place_fields[p], ad),
        },
        {"match known as": "not at all (quality + price)", **share(0 * user[u], ad)},
    ]
    print_table(
        f"match ceiling on {args.date}: {len(requests)} requests x {len(live)} live ads", rows
    )
    path = write_json(
        f"match_ceiling-{date:%Y%m%d}",
        {
            "root": str(args.root),
            "date": args.date,
            "requests": len(requests),
            "explained": explained,
            "rows": rows,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
