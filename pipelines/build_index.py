"""``deepclick index --date D``: build, measure and publish the ANNOY index over D's ad vectors.

Reads the embeddings published for D, the popular-ads table and the training clicks per ad of D's
features, and hands them to ``candidates.index.build_index``, which measures ANN recall against
exact search and refuses to publish below the configured floor. Before publishing, the funnel
check (``candidates.funnel``) asks the staged index for candidates exactly as serving will, for a
sample of D's clicked impressions, and refuses the index when they hold fewer of D's clicks than
the same number of most clicked training ads at any K of ``lifecycle.recall_ks``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from candidates.funnel import FunnelParams, FunnelRefused, funnel_check, refusal_message
from candidates.index import CandidateIndex, build_index
from candidates.service import CandidateService
from candidates.store import read_embeddings
from deepclick.settings import Settings

EVAL_COLUMNS = ["user_id", "placement_id", "ad_id", "label"]


def popularity_rows(features: Path) -> list[tuple[str, str, int]]:
    """(placement_id, ad_id, clicks) rows of the features' popularity table."""
    table = pq.read_table(features / "popularity", columns=["placement_id", "ad_id", "clicks"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def training_counts(features: Path) -> dict[str, tuple[float, float]]:
    """(clicks, impressions) per ad over the training days (``training/ranking``), by Arrow."""
    table = pq.read_table(features / "training" / "ranking", columns=["ad_id", "label"])
    grouped = table.group_by("ad_id").aggregate([("label", "sum"), ("label", "count")])
    data = grouped.to_pydict()
    return {
        str(ad): (float(c), float(n))
        for ad, c, n in zip(data["ad_id"], data["label_sum"], data["label_count"], strict=True)
    }


def most_clicked(counts: dict[str, tuple[float, float]], n: int) -> list[str]:
    """The ``n`` most clicked ads in the order of contracts §3 ``popularity`` (more clicks, then
    more impressions, then ad id): the baseline the funnel must not lose to."""
    ranked = sorted((-c, -i, a) for a, (c, i) in counts.items() if c > 0)
    return [ad for _, _, ad in ranked[:n]]


def day_clicks(features: Path, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` clicked impressions of D (``eval``), a seeded sample; empty without eval."""
    table = features / "eval"
    if not table.exists():
        return pd.DataFrame(columns=EVAL_COLUMNS)
    rows = pd.read_parquet(table, columns=EVAL_COLUMNS)
    clicked = rows[rows["label"] == 1]
    return clicked.sample(n=min(n, len(clicked)), random_state=seed) if len(clicked) else clicked


def candidates_check(
    embeddings_folder: Path,
    queries: list[tuple[str, str]],
    clicked: list[str],
    popular: list[str],
    ks: list[int],
    *,
    popular_quota: float,
    tolerance: float,
    z: float,
    min_clicks: int,
    refuse: bool,
    date: str,
) -> Callable[[CandidateIndex], dict[str, Any]]:
    """The check ``build_index`` runs on a staged index: serving's candidates for each clicked
    ``(user, placement)`` query against the ``popular`` ads, at every K, the fresh slots counted
    apart; raises FunnelRefused (when ``refuse``) if the candidates lose at any K."""

    def check(index: CandidateIndex) -> dict[str, Any]:
        service = CandidateService(
            index, read_embeddings(embeddings_folder), popular_quota=popular_quota
        )
        # One request per K, as serving gets them (a list for 500 is not the list for 100 extended).
        candidates = {k: [service.candidates(u, p, k).ad_ids for u, p in queries] for k in ks}
        fresh = [service.index_id(int(row)) for row in index.fresh]  # UTF-8 ids, decoded
        result = funnel_check(
            candidates,
            popular,
            clicked,
            tolerance=tolerance,
            z=z,
            min_clicks=min_clicks,
            fresh=fresh,
        )
        if refuse and result["decision"] == "refuse":
            raise FunnelRefused(refusal_message(index.manifest["version"], date, result))
        return result

    return check


def funnel_checker(
    settings: Settings,
    date: dt.date,
    embeddings_folder: Path,
    features: Path,
    counts: dict[str, tuple[float, float]],
) -> Callable[[CandidateIndex], dict[str, Any]]:
    """:func:`candidates_check` on a seeded sample of D's clicked impressions (``eval`` of the
    ``features`` folder, at most ``lifecycle.recall_queries``) at every K of
    ``lifecycle.recall_ks``."""
    cfg = settings.index
    ks = sorted(set(settings.lifecycle.recall_ks))
    sample = day_clicks(features, settings.lifecycle.recall_queries, cfg.seed)
    return candidates_check(
        embeddings_folder,
        list(zip(sample["user_id"].astype(str), sample["placement_id"].astype(str), strict=True)),
        sample["ad_id"].astype(str).tolist(),
        most_clicked(counts, max(ks)),
        ks,
        popular_quota=cfg.popular_quota,
        tolerance=cfg.funnel_tolerance,
        z=cfg.funnel_z,
        min_clicks=cfg.funnel_min_clicks,
        refuse=cfg.funnel_refuse,
        date=date.isoformat(),
    )


def run_index(
    settings: Settings, date: dt.date, *, embeddings: Path, features: Path, out: Path
) -> Path:
    """Index the ad vectors of the ``embeddings`` folder of D, measure the ANN recall and the
    funnel on D's ``features``, and publish the index as ``out`` (``<parent>/<version>``, named
    by the caller); return ``out``."""
    cfg = settings.index
    counts = training_counts(features)
    return build_index(
        embeddings,
        out.parent,
        popularity=popularity_rows(features),
        metric=cfg.metric,
        n_trees=cfg.n_trees,
        search_k=cfg.search_k,
        recall_k=cfg.recall_k,
        recall_queries=cfg.recall_queries,
        recall_floor=cfg.recall_floor,
        seed=cfg.seed,
        tune_search_k=cfg.tune_search_k,
        version=out.name,
        clicks={ad: c for ad, (c, _) in counts.items()},
        trained_ads=counts.keys(),
        funnel=FunnelParams(
            cfg.prior_weight, cfg.prior_smoothing, cfg.explore_share, cfg.fresh_share
        ),
        check=funnel_checker(settings, date, embeddings, features, counts),
    )
