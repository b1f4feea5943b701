"""Choose the two-tower training settings by the funnel they give: train variants in process on
day D's features and measure, on a seeded sample of D's clicks, recall@K of
``query·ad + beta·log(training clicks + 1)`` (exact search over every ad of ``entities/ads``)
against the K most clicked training ads, with the paired 95% interval of the difference.

Where ``bench/funnel_prior.py`` varies the merge over published embeddings, this varies the
towers (negatives, epochs, batch size, dropout…): each ``--variant NAME=JSON`` overrides
``two_tower`` settings. Vectors come from :meth:`TrainedTowers.embed`, the functions the exported
SavedModels serve. Usage (a state root whose daily run for D has published features)::

    python -m bench.funnel_towers --root var/bench-quality/medium --date 2024-01-08 \\
        --variant 'inbatch={"uniform_negatives": 0}' --variant 'mixed={}' \\
        [--truth var/bench-quality/medium/raw/marketplace]

``--match-requests N`` (generated data) also asks what each variant's score ``query·ad`` carries
of the latent match (``bench/match_ceiling.py``): for N of D's requests every live ad is ranked by
the true quality and price plus ``β`` times the score, alone and beside the match the fields
carry, and the top-10 slates valued by the truth — the ranker takes that score as its only
carrier of the per-entity match.

``--truth`` (a generated world) adds the oracle funnel: every live ad ranked by its true expected
clicks for the query — the chance the logging policy shows it (popularity × bid for the untargeted
share, best of ``targeting_candidates`` random live ads for the targeted share) times its true
click probability — the ceiling any learned funnel can reach on that day.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from bench.common import generated_world, write_json
from deepclick import layout
from deepclick.layout import version_for
from deepclick.publish import resolve
from deepclick.settings import Settings
from models.evaluation.retrieval_report import sample_clicks
from models.feature_spec import load_feature_spec
from models.two_tower.train import TrainedTowers, train_two_tower
from pipelines.towers import training_days


def popular_ads(features: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Training clicks and impressions per ad, and the ad ids most clicked first (ties: more
    impressions first, the order contracts §3 and the index check use)."""
    table = pq.read_table(features / "training" / "ranking", columns=["ad_id", "label"])
    frame = table.to_pandas().assign(ad_id=lambda f: f["ad_id"].astype(str))
    stats = frame.groupby("ad_id")["label"].agg(clicks="sum", impressions="count")
    order = stats.sort_values(["clicks", "impressions"], ascending=False).index.to_numpy()
    return stats, order


def query_vectors(trained: TrainedTowers, clicks: pd.DataFrame, features: Path) -> np.ndarray:
    """user + placement vectors of each sampled click, unknown ids → the all-missing vector."""
    parts = []
    for role, table, key in (
        ("user", "users", "user_id"),
        ("context", "placements", "placement_id"),
    ):
        wanted = clicks[key].astype(str)
        frame = pd.read_parquet(features / "entities" / table)
        frame = frame[frame[key].astype(str).isin(set(wanted))].reset_index(drop=True)
        vectors = trained.embed(role, frame)
        fallback = trained.embed(role, {f.name: [None] for f in trained.features(role)})[0]
        row = dict(zip(frame[key].astype(str), range(len(frame)), strict=True))
        parts.append(np.stack([vectors[row[i]] if i in row else fallback for i in wanted]))
    return parts[0] + parts[1]


def recall_rows(
    sims: np.ndarray, prior: np.ndarray, beta: float, ad_ids: np.ndarray, clicked: np.ndarray, ks
) -> dict[int, np.ndarray]:
    """Per click and K: 1 when the clicked ad is among the K best ``sims + beta·prior``."""
    score = sims + beta * prior[None, :]
    kmax = max(ks)
    top = np.argpartition(-score, kmax - 1, axis=1)[:, :kmax]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1), 1)
    return {
        k: np.array([c in set(ad_ids[t[:k]]) for c, t in zip(clicked, top, strict=True)], float)
        for k in ks
    }


def oracle_hits(
    truth: Path, date: str, clicks: pd.DataFrame, ks, settings: Settings, block: int = 200
) -> dict[int, np.ndarray]:
    """Per click and K: 1 when the clicked ad is among the K live ads with the most expected
    clicks for its (user, placement) under the world's logging policy and click model."""
    from pipelines.simulate.world import ad_score, index_of, live_ads, sigmoid
    from pipelines.simulate.writer import load_world

    world = load_world(truth)
    user = index_of(world, "user", clicks["user_id"].astype(str).to_numpy())
    placement = index_of(world, "placement", clicks["placement_id"].astype(str).to_numpy())
    clicked = index_of(world, "ad", clicks["ad_id"].astype(str).to_numpy())
    live = live_ads(world, date)
    weight = world.ad_popularity[live] * world.ad_bid[live]
    untargeted = weight / weight.sum()
    share, tried = settings.simulate.targeted_share, settings.simulate.targeting_candidates
    hits = {k: np.zeros(len(clicked)) for k in ks}
    for start in range(0, len(clicked), block):
        rows = slice(start, start + block)
        score = ad_score(world, user[rows], placement[rows], live, all_pairs=True)
        rank = np.argsort(np.argsort(-score, axis=1), axis=1) / len(live)  # 0 = best
        targeted = (1 - rank) ** tried - (1 - rank - 1 / len(live)) ** tried
        # sigmoid(s - 4) ~ exp(s) up to a per-query constant at this marketplace's 3% CTR
        expected = (share * targeted + (1 - share) * untargeted) * sigmoid(score - 4.0)
        ranked = live[np.argsort(-expected, axis=1)[:, : max(ks)]]
        for k in ks:
            hits[k][rows] = [c in set(r[:k]) for c, r in zip(clicked[rows], ranked, strict=True)]
    return hits


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Recall, ratio to popularity and the paired 95% interval of the difference."""
    diff = ours - theirs
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    return {
        "recall": round(float(ours.mean()), 4),
        "ratio": round(float(ours.mean() / max(theirs.mean(), 1e-12)), 3),
        "diff_low": round(float(diff.mean() - half), 4),
        "diff_high": round(float(diff.mean() + half), 4),
    }


def match_rows(
    ceiling: Any, trained: TrainedTowers, ad_frame: pd.DataFrame, features: Path
) -> dict[str, Any]:
    """Slates (share of the oracle) of the true quality and price plus ``β·query·ad`` of these
    towers, alone and beside the fields' match (:class:`bench.match_ceiling.MatchCeiling`)."""
    from bench.match_ceiling import share_rows

    query = query_vectors(trained, ceiling.requests, features)
    vectors = trained.embed("ad", ad_frame)
    row = {ad_id: i for i, ad_id in enumerate(ad_frame["ad_id"].astype(str))}
    live_ids = np.asarray(ceiling.world.ad_ids)[ceiling.live].astype(str)
    ads = np.zeros((len(live_ids), vectors.shape[1]), dtype=np.float32)
    known = np.array([i in row for i in live_ids])
    ads[known] = vectors[[row[i] for i in live_ids[known]]]
    systems, betas = ceiling.tower_systems(query @ ads.T, (0.125, 0.25, 0.5, 1.0, 2.0, 4.0))
    return {
        "betas": betas,
        "rows": {
            r["match known as"]: [r["of_oracle"], r["ci_low"], r["ci_high"]]
            for r in share_rows(ceiling, systems, 7)
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="state root of the daily run")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--ks", default="50,100,500,1000")
    parser.add_argument("--betas", default="0,1,2,3")
    parser.add_argument("--all-days", action="store_true", help="towers on every training day")
    parser.add_argument("--truth", type=Path, help="generated world: add the oracle funnel")
    parser.add_argument(
        "--match-requests",
        type=int,
        default=0,
        help="generated data: what each variant's score carries of the match, on N requests",
    )
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    settings = Settings(root=args.root)
    version = version_for(dt.date.fromisoformat(args.date))
    features = resolve(layout.warehouse(settings.root) / "features", version, what="features")
    spec = load_feature_spec(features)
    dates = tuple(sorted(spec.train_dates))
    if not args.all_days:  # the served towers' days (the whole window when refitted)
        dates = training_days(settings, spec.train_dates).served
    rows = pd.read_parquet(features / "eval", columns=["user_id", "placement_id", "ad_id", "label"])
    clicks = sample_clicks(rows, args.queries, 7)
    clicked = clicks["ad_id"].astype(str).to_numpy()
    stats, popular = popular_ads(features)
    ad_frame = pd.read_parquet(features / "entities" / "ads")
    ad_ids = ad_frame["ad_id"].astype(str).to_numpy()
    prior = np.log(stats["clicks"].reindex(ad_ids).fillna(0).to_numpy(float) + 1.0)
    baseline = {k: np.isin(clicked, popular[:k]).astype(float) for k in ks}
    print(f"{version}: {len(ad_ids)} ads, {len(clicked)} clicks, towers on {', '.join(dates)}")
    print("popularity " + " ".join(f"@{k} {baseline[k].mean():.4f}" for k in ks), flush=True)
    results: dict[str, Any] = {"popularity": {k: float(baseline[k].mean()) for k in ks}}
    if args.truth is not None:
        oracle = oracle_hits(args.truth, args.date, clicks, ks, settings)
        results["oracle"] = {k: compare(oracle[k], baseline[k]) for k in ks}
        print(
            "oracle     "
            + " ".join(
                f"@{k} {c['recall']:.4f} x{c['ratio']:.2f}" for k, c in results["oracle"].items()
            ),
            flush=True,
        )
    ceiling = None
    if args.match_requests > 0:
        from bench.match_ceiling import match_ceiling

        ceiling = match_ceiling(
            generated_world(settings.root, spec.dataset, "--match-requests"),
            pd.read_parquet(features / "eval"),
            dt.date.fromisoformat(args.date),
            args.match_requests,
            7,
        )
    for variant in args.variant:
        name, _, overrides = variant.partition("=")
        tt = settings.two_tower.model_copy(update=json.loads(overrides or "{}"))
        started = time.perf_counter()
        trained = train_two_tower(spec, tt, progress=False, dates=dates)
        seconds = time.perf_counter() - started
        sims = query_vectors(trained, clicks, features) @ trained.embed("ad", ad_frame).T
        for beta in [float(b) for b in args.betas.split(",")]:
            hit = recall_rows(sims, prior, beta, ad_ids, clicked, ks)
            curve = {k: compare(hit[k], baseline[k]) for k in ks}
            results[f"{name} beta={beta}"] = curve
            shown = " | ".join(
                f"@{k} {c['recall']:.4f} x{c['ratio']:.2f} "
                f"[{c['diff_low']:+.3f},{c['diff_high']:+.3f}]"
                for k, c in curve.items()
            )
            print(f"{name:24s} beta={beta:<4} {shown}  ({seconds:.0f} s)", flush=True)
        if ceiling is not None:
            results[f"{name} match"] = match_rows(ceiling, trained, ad_frame, features)
            print(f"{name:24s} match carried: {results[f'{name} match']}", flush=True)
    path = write_json(f"funnel-towers-{version}", {"root": str(args.root), "results": results})
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
