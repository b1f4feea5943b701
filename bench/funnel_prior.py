"""Measure candidate choices on a day's clicks: the two-tower score with the popularity prior
added back (``q·a + beta·log(clicks + alpha)``), a share kept for pure similarity (cold start),
against the same number of popular ads.

Exact search over every ad (the index's ANN recall is measured elsewhere), so the numbers are the
funnel's design, not ANNOY's. Usage (a state root where the daily run for D has published
features and embeddings)::

    python -m bench.funnel_prior --root var/demo --date 2024-01-04 [--day-from-features eval]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from candidates.store import read_embeddings
from deepclick.layout import version_for
from deepclick.publish import resolve
from deepclick.topk import top_k_rows
from models.evaluation.retrieval import recall_at_k
from models.evaluation.retrieval_report import additive_queries, sample_clicks


def clicks_per_ad(features: Path, half_life: float = 0.0) -> pd.Series:
    """Training clicks per ad; with ``half_life`` (days) a click of d days before the last
    training day counts 0.5**(d / half_life)."""
    table = pq.read_table(features / "training" / "ranking", columns=["date", "ad_id", "label"])
    frame = table.to_pandas()
    frame = frame[frame["label"] == 1]
    if half_life > 0:
        days = pd.to_datetime(frame["date"].astype(str))
        age = (days.max() - days).dt.days.to_numpy()
        frame = frame.assign(label=0.5 ** (age / half_life))
    return frame.groupby(frame["ad_id"].astype(str))["label"].sum()


def merged(primary: np.ndarray, secondary: np.ndarray, k: int, share: float) -> list[list[int]]:
    """First ``k - round(k*share)`` of primary, then secondary (distinct), then primary."""
    n_primary = k - int(k * share + 0.5)
    out = []
    for a, b in zip(primary, secondary, strict=True):
        seen: dict[int, None] = dict.fromkeys(a[:n_primary].tolist())
        for row in b.tolist():
            if len(seen) >= k:
                break
            seen.setdefault(row)
        for row in a.tolist():
            if len(seen) >= k:
                break
            seen.setdefault(row)
        out.append(list(seen))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--ks", default="50,100,200,500,1000")
    parser.add_argument("--betas", default="0,0.25,0.5,0.75,1,1.5,2,3")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--shares", default="0,0.1,0.2")
    parser.add_argument("--half-life", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    date = dt.date.fromisoformat(args.date)
    version = version_for(date)
    root = args.root.resolve()
    features = resolve(root / "warehouse" / "features", version, what="features")
    emb = read_embeddings(resolve(root / "artifacts" / "embeddings", version, what="embeddings"))
    ks = [int(k) for k in args.ks.split(",")]
    kmax = max(ks)

    rows = pd.read_parquet(features / "eval", columns=["user_id", "placement_id", "ad_id", "label"])
    queries = sample_clicks(rows, args.queries, 7)
    users = queries["user_id"].astype(str).tolist()
    placements = queries["placement_id"].astype(str).tolist()
    clicked = queries["ad_id"].astype(str).to_numpy()
    q, _, _ = additive_queries(
        emb.users, emb.placements, emb.fallback_user, emb.fallback_placement, users, placements
    )
    ad_ids = np.array([bytes(a).decode() for a in emb.ads.ids])
    ads = np.asarray(emb.ads.vectors, dtype=np.float32)
    clicks = clicks_per_ad(features).reindex(ad_ids).fillna(0).to_numpy(dtype=np.float64)
    weighted = (
        clicks_per_ad(features, args.half_life).reindex(ad_ids).fillna(0).to_numpy(np.float64)
    )
    sims = q @ ads.T

    def recall(rows_per_query) -> dict[int, float]:
        ranked = [ad_ids[np.asarray(r, dtype=np.int64)] for r in rows_per_query]
        return {k: round(recall_at_k([r[:k] for r in ranked], clicked, [k])[k], 4) for k in ks}

    results: dict[str, dict[int, float]] = {}
    pop_rows = np.argsort(-clicks - 1e-9 * np.arange(len(clicks)), kind="stable")[:kmax]
    pop_recall = recall(np.broadcast_to(pop_rows, (len(q), kmax)))
    results["popularity"] = pop_recall
    pure = top_k_rows(sims, kmax)
    prior = np.log(weighted + args.alpha)
    for beta in [float(b) for b in args.betas.split(",")]:
        boosted = top_k_rows(sims + beta * prior[None, :], kmax)
        for share in [float(s) for s in args.shares.split(",")]:
            name = f"beta={beta} explore={share}"
            if share == 0:
                results[name] = recall(boosted)
            else:
                results[name] = {
                    k: recall(merged(boosted[:, :k], pure[:, :k], k, share))[k] for k in ks
                }
    # today's design: ANN (exact here) + 10% popular quota
    results["tt+quota0.1"] = {
        k: recall(merged(pure[:, :k], np.broadcast_to(pop_rows[:k], (len(q), k)), k, 0.1))[k]
        for k in ks
    }
    print(f"{'method':32s} " + " ".join(f"@{k:<6d}" for k in ks) + "  min ratio vs pop")
    for name, curve in results.items():
        ratio = min(curve[k] / pop_recall[k] for k in ks if pop_recall[k] > 0)
        print(
            f"{name:32s} " + " ".join(f"{curve[k]:.4f} " for k in ks) + f"  {ratio:.3f}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
