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
    from lifecycle.replay import SLOTS, oracle_slates, sample_requests, true_slates
    from models.evaluation.replay import ORACLE, replay_report
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

    def slates(context: np.ndarray | None, ads: np.ndarray | None) -> np.ndarray:
        """True click probabilities of the top-10 of every live ad scored by the true quality
        and price taste plus ``scale · context · ads`` (no match term when ``context`` is None)."""
        score = base if context is None else base + world.scale * (context @ ads[live].T)
        top = np.argsort(-score, axis=1)[:, :SLOTS]
        return true_slates(world, requests, [world.ad_ids[live[t]].tolist() for t in top])

    scorers = {
        "the true factors (the oracle)": (user[u] + place[p], ad),
        "profile, page type, slot x category, brand (what crosses carry)": (
            user_fields[u] + place_fields[p],
            ad_fields,
        ),
        "true user + placement x category, brand": (user[u] + place[p], ad_fields),
        "profile, page type, slot x true ad factor": (user_fields[u] + place_fields[p], ad),
        "not at all (quality + price)": (None, None),
    }
    report = replay_report(
        {ORACLE: oracle_p, **{name: slates(*parts) for name, parts in scorers.items()}},
        ks=(SLOTS,),
        bootstrap=500,
        seed=args.seed,
    )
    rows = []
    for name in scorers:
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
