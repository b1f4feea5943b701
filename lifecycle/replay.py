"""The replay of day D against the truth: what the served slates are worth (issue 10, item 1).

The evaluation day's requests — (user, placement, hour) of a seeded sample of D's impressions —
are answered by the release exactly as ``POST /v1/rank`` answers them: :func:`serving.ranking.rank`
in process, no HTTP, no second ranking path. Every comparator is that same function over the same
release with one part swapped (``dataclasses.replace`` of the loaded release):

- ``deepclick``: the release as served (two-tower + popular candidates, the ranker);
- ``ranker_all_ads``: candidates = every live ad of the catalogue (what the funnel costs);
- ``ranker_popular_candidates``: candidates = the most popular ads of the placement, as many as
  serving scores (what the two-tower stage adds);
- ``lr_same_candidates``: the release's own candidates ranked by the one-hot LR peer;

and, without a ranker: ``oracle`` (the world's best live ads for that user, placement and hour),
``popularity`` (most training clicks), ``popularity_placement`` (the placement's, continued by the
overall list) and ``random`` (live ads drawn uniformly). The true click probability of every
served ad comes from the generated world (``pipelines.simulate``); the numbers from
``models/evaluation/replay.py``. Where no world exists, :func:`funnel_recall` reports the share
of D's clicked (user, ad) pairs that the served candidate list holds.

This module sits with the daily lifecycle (it loads releases, like ``lifecycle/stages.py``'s
publish step); the stages call it, serving never does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import zoneinfo
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from candidates.service import CandidateResult
from models.evaluation.peers import LOGISTIC, Peer, Peers, inputs_frame
from models.evaluation.replay import (
    ORACLE,
    POPULARITY,
    render_replay_markdown,
    replay_plot,
    replay_report,
)
from models.evaluation.retrieval import recall_at_k

if TYPE_CHECKING:
    from deepclick.settings import Settings
    from pipelines.simulate import World
    from serving.release import LoadedRelease

log = logging.getLogger(__name__)

SLOTS = 10
REPORT_FILE = "replay.json"
PLOT_FILE = "replay.png"
MARKDOWN_FILE = "replay.md"
DEEPCLICK = "deepclick"
POPULARITY_PLACEMENT = "popularity_placement"
RANDOM = "random"
RANKER_ALL = "ranker_all_ads"
RANKER_POPULAR = "ranker_popular_candidates"
LR_SAME = "lr_same_candidates"
DESCRIPTIONS = {
    ORACLE: "the world's 10 best live ads for the request's user, placement and hour",
    DEEPCLICK: "the release through serving.ranking.rank, as POST /v1/rank answers",
    RANKER_ALL: "the release's ranker over every live ad of the catalogue (no candidate stage), "
    "on the first requests only (all_ads_requests), ratios against the same requests",
    RANKER_POPULAR: "the release's ranker over the placement's most popular ads as candidates",
    LR_SAME: "the one-hot LR peer ranking the release's own candidates",
    POPULARITY: "the 10 live ads with the most training clicks",
    POPULARITY_PLACEMENT: "the placement's most clicked live ads, continued by the overall list",
    RANDOM: "10 live ads drawn uniformly",
}


# --------------------------------------------------------------------------- requests


def sample_requests(
    eval_rows: pd.DataFrame, n: int, *, seed: int = 7, hour_column: str = "ctx__hour"
) -> pd.DataFrame:
    """A seeded sample of ``n`` of D's impressions as requests: ``user_id``, ``placement_id``,
    ``hour`` (the impression's hour of day in the dataset's zone; 0 when the rows lack it).

    Raises:
        ValueError: no rows to sample.
    """
    if eval_rows.empty:
        raise ValueError("the evaluation day has no impressions to replay")
    rows = eval_rows.sample(n=min(n, len(eval_rows)), random_state=seed)
    hours = (
        pd.to_numeric(rows[hour_column], errors="coerce").fillna(0).astype(int) % 24
        if hour_column in rows.columns
        else pd.Series(0, index=rows.index)
    )
    return pd.DataFrame(
        {
            "user_id": rows["user_id"].astype(str).to_numpy(),
            "placement_id": rows["placement_id"].astype(str).to_numpy(),
            "hour": hours.to_numpy(dtype=np.int64),
        }
    )


def request_times(date: dt.date, hours: np.ndarray, timezone: str) -> list[dt.datetime]:
    """Half past each hour of ``date`` in the release's zone: the time a replayed request carries
    (it sets the request-time features ``ctx__hour`` / ``ctx__dow``)."""
    zone = zoneinfo.ZoneInfo(timezone)
    return [dt.datetime.combine(date, dt.time(int(h), 30), tzinfo=zone) for h in hours]


# --------------------------------------------------------------------------- popularity


def popularity_lists(
    counts: pd.DataFrame, catalogue: Collection[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """Ads of the catalogue by training clicks (then impressions, then id): overall, and per
    placement (each continued by the overall list). ``counts``: placement_id, ad_id, clicks,
    impressions (``pipelines.retrieval_eval.training_counts``)."""
    known = counts[counts["ad_id"].astype(str).isin(set(catalogue))].copy()
    known["ad_id"] = known["ad_id"].astype(str)
    overall = (
        known.groupby("ad_id")[["clicks", "impressions"]]
        .sum()
        .reset_index()
        .sort_values(["clicks", "impressions", "ad_id"], ascending=[False, False, True])
    )
    global_list = overall["ad_id"].tolist()
    listed = set(global_list)  # once: a set per catalogue ad made this quadratic (120k ads: hours)
    global_list += [a for a in sorted(catalogue) if a not in listed]
    by_placement: dict[str, list[str]] = {}
    ordered = known.sort_values(
        ["placement_id", "clicks", "impressions", "ad_id"], ascending=[True, False, False, True]
    )
    for placement, rows in ordered.groupby("placement_id", sort=False):
        own = rows.loc[rows["clicks"] > 0, "ad_id"].tolist()
        by_placement[str(placement)] = own
    return global_list, by_placement


def _continued(own: Sequence[str], overall: Sequence[str], k: int) -> list[str]:
    out = list(dict.fromkeys(own))[:k]
    seen = set(out)
    for ad in overall:
        if len(out) >= k:
            break
        if ad not in seen:
            out.append(ad)
            seen.add(ad)
    return out


# --------------------------------------------------------------------------- swapped parts


class FixedCandidates:
    """A candidate stage that returns a given list (per placement), in the shape of
    ``CandidateService.candidates``: what ``rank`` scores when the funnel is replaced."""

    def __init__(self, lists: Callable[[str], Sequence[str]]) -> None:
        self.lists = lists

    def candidates(
        self,
        user_id: str | None,
        placement_id: str | None,
        k: int,
        exclude: Collection[str] = (),
        **_: Any,
    ) -> CandidateResult:
        excluded = set(exclude)
        ads = [a for a in self.lists(placement_id or "") if a not in excluded][:k]
        n = len(ads)
        return CandidateResult.from_ids(ads, [float(n - i) for i in range(n)], "popular")


class PeerBackend:
    """A peer in the shape of a ranker backend (``predict(common, candidates)``), so ``rank``
    ranks with it through the same flow as with the ranker."""

    kind = "peer"

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def predict(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        if not candidates or not len(next(iter(candidates.values()))):
            return np.zeros(0, dtype=np.float32)
        return self.peer.predict(inputs_frame(common, candidates)).astype(np.float32)


# --------------------------------------------------------------------------- serving


def served_slates(
    release: LoadedRelease,
    requests: pd.DataFrame,
    date: dt.date,
    *,
    num_candidates: int | None = None,
    slots: int = SLOTS,
) -> list[list[str]]:
    """Each request answered by ``rank`` over ``release``: the served top-``slots`` ad ids."""
    from serving.metrics import ServingMetrics
    from serving.ranking import RankLimits, rank
    from serving.schemas import RankRequest

    metrics = ServingMetrics()
    k = num_candidates or 500
    limits = RankLimits(
        default_candidates=k, max_candidates=max(k, 1), max_exclude_ads=0, timeout_s=120.0
    )
    times = request_times(date, requests["hour"].to_numpy(), release.features.timezone)
    served = []
    for user, placement, when in zip(
        requests["user_id"], requests["placement_id"], times, strict=True
    ):
        request = RankRequest(
            user_id=user,
            placement_id=placement,
            num_ads=slots,
            num_candidates=k,
            request_time=when,
        )
        answer = rank(release, request, limits, metrics)
        if answer.degraded:
            raise RuntimeError(f"the replay's ranker answered degraded: {answer.reason}")
        served.append([ad.ad_id for ad in answer.ads])
    return served


def release_catalogue(release: LoadedRelease) -> list[str]:
    """Every ad the release's index holds (what serving can show)."""
    service = release.candidates
    return [service.index_id(row) for row in range(len(service.index))]


# --------------------------------------------------------------------------- truth


def true_slates(
    world: World, requests: pd.DataFrame, slates: Sequence[Sequence[str]], slots: int = SLOTS
) -> np.ndarray:
    """``[requests, slots]`` true click probabilities of the served ads (NaN: empty slot).

    Raises:
        ValueError: an id is not in the world (the release was built from another dataset).
    """
    from pipelines.simulate import index_of, true_click_probability

    try:
        users = index_of(world, "user", requests["user_id"].to_numpy(dtype=str))
        placements = index_of(world, "placement", requests["placement_id"].to_numpy(dtype=str))
    except KeyError as exc:
        raise ValueError(f"replay: {exc.args[0]}; the world must be the one behind D") from None
    hours = requests["hour"].to_numpy(dtype=np.int64)
    out = np.full((len(requests), slots), np.nan)
    flat = [(i, j, ad) for i, ads in enumerate(slates) for j, ad in enumerate(ads[:slots])]
    if not flat:
        return out
    rows, cols, ads = zip(*flat, strict=True)
    try:
        ad_idx = index_of(world, "ad", np.asarray(ads, dtype=str))
    except KeyError as exc:
        raise ValueError(f"replay: {exc.args[0]}; the world must be the one behind D") from None
    rows_a = np.asarray(rows)
    out[rows_a, np.asarray(cols)] = true_click_probability(
        world, users[rows_a], placements[rows_a], ad_idx, hours[rows_a]
    )
    return out


def oracle_slates(world: World, requests: pd.DataFrame, date: dt.date, slots: int = SLOTS):
    """The world's best ``slots`` live ads per request and their true probabilities."""
    from pipelines.simulate import best_ads, index_of

    users = index_of(world, "user", requests["user_id"].to_numpy(dtype=str))
    placements = index_of(world, "placement", requests["placement_id"].to_numpy(dtype=str))
    best, p = best_ads(
        world, users, placements, requests["hour"].to_numpy(dtype=np.int64), slots, day=date
    )
    return world.ad_ids[best].tolist(), p


# --------------------------------------------------------------------------- the replay


def replay(
    release: LoadedRelease,
    world: World,
    requests: pd.DataFrame,
    date: dt.date,
    *,
    counts: pd.DataFrame,
    peers: Peers | None = None,
    num_candidates: int = 500,
    all_ads: int = 200,
    bootstrap: int = 200,
    seed: int = 7,
) -> dict[str, Any]:
    """Every comparator's top-10 over ``requests``, valued by ``world``; the report dict of
    ``models.evaluation.replay.replay_report`` plus descriptions and timings.

    The ranker over every live ad scores the whole catalogue per request, so it answers only the
    first ``all_ads`` requests; its ratios are taken against the oracle and popularity on those
    same requests (``report["all_ads_requests"]``)."""
    from pipelines.simulate import live_ads

    live = set(world.ad_ids[live_ads(world, date)].tolist())
    catalogue = [a for a in release_catalogue(release) if a in live]
    if not catalogue:
        raise ValueError(f"replay: no ad of the release's index is live on {date}")
    overall, by_placement = popularity_lists(counts, catalogue)
    timings: dict[str, float] = {}
    ids: dict[str, list[list[str]]] = {}

    def timed(
        name: str, rows: pd.DataFrame = requests, k: int = num_candidates, **parts: Any
    ) -> None:
        """Serve ``rows`` through the release with ``parts`` swapped in (the candidate stage,
        the backend); keep the slates and the seconds they took."""
        tick = time.perf_counter()
        served = dataclasses.replace(release, **parts) if parts else release
        ids[name] = served_slates(served, rows, date, num_candidates=k)
        timings[name] = round(time.perf_counter() - tick, 3)

    timed(DEEPCLICK)
    subset = requests.head(min(all_ads, len(requests)))
    if len(subset):
        timed(RANKER_ALL, subset, len(catalogue), candidates=FixedCandidates(lambda _: catalogue))
    popular = FixedCandidates(
        lambda p: _continued(by_placement.get(p, ()), overall, num_candidates)
    )
    timed(RANKER_POPULAR, candidates=popular)
    if peers is not None and LOGISTIC in peers.models:
        timed(LR_SAME, backend=PeerBackend(peers.models[LOGISTIC]))
    ids[POPULARITY] = [overall[:SLOTS]] * len(requests)
    ids[POPULARITY_PLACEMENT] = [
        _continued(by_placement.get(p, ()), overall, SLOTS) for p in requests["placement_id"]
    ]
    rng = np.random.default_rng(seed)
    pool = np.asarray(catalogue, dtype=object)
    ids[RANDOM] = [
        pool[rng.choice(len(pool), min(SLOTS, len(pool)), replace=False)].tolist()
        for _ in range(len(requests))
    ]
    oracle_ids, oracle_p = oracle_slates(world, requests, date)
    slates = {ORACLE: oracle_p}
    for name, lists in ids.items():
        if name != RANKER_ALL:
            slates[name] = true_slates(world, requests, lists)
    report = replay_report(slates, bootstrap=bootstrap, seed=seed)
    if RANKER_ALL in ids:
        n = len(subset)
        partial = {name: s[:n] for name, s in slates.items() if name in (ORACLE, POPULARITY)}
        partial[RANKER_ALL] = true_slates(world, subset, ids[RANKER_ALL])
        report["systems"][RANKER_ALL] = replay_report(partial, bootstrap=bootstrap, seed=seed)[
            "systems"
        ][RANKER_ALL]
        report["all_ads_requests"] = n
    report["date"] = date.isoformat()
    report["release"] = release.version
    report["catalogue_live_ads"] = len(catalogue)
    report["num_candidates"] = num_candidates
    report["descriptions"] = {k: DESCRIPTIONS[k] for k in report["systems"] if k in DESCRIPTIONS}
    report["seconds"] = timings
    report["examples"] = {name: lists[:3] for name, lists in {ORACLE: oracle_ids, **ids}.items()}
    return report


def funnel_recall(
    release: LoadedRelease,
    eval_rows: pd.DataFrame,
    ks: Sequence[int],
    *,
    queries: int,
    seed: int = 7,
) -> dict[str, Any]:
    """Where no truth exists: the share of D's clicked (user, ad) pairs that the candidate list
    serving would score holds, at each K (the release's own candidate stage).

    Each K is its own query for K candidates: the first K of a longer list are not the K-list,
    since the quotas and the popularity prior merge sources without a common order."""
    clicks = eval_rows[eval_rows["label"] == 1]
    if clicks.empty:
        raise ValueError("the evaluation day has no clicks: funnel recall is undefined")
    clicks = clicks.sample(n=min(queries, len(clicks)), random_state=seed)
    clicked = clicks["ad_id"].astype(str).to_numpy()
    recall: dict[str, float] = {}
    for k in sorted(set(ks)):
        lists = [
            release.candidates.candidates(str(u), str(p), k).ad_ids
            for u, p in zip(clicks["user_id"], clicks["placement_id"], strict=True)
        ]
        recall[str(k)] = recall_at_k(lists, clicked, [k])[k]
    return {"clicks": len(clicks), "recall_at_k": recall}


def write_replay(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """``replay.json``, ``replay.png`` and ``replay.md`` (the report's section) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / REPORT_FILE, "markdown": out / MARKDOWN_FILE}
    files["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    files["markdown"].write_text(render_replay_markdown(report), encoding="utf-8")
    files["plot"] = replay_plot(report, out / PLOT_FILE)
    return files


def replay_day(
    settings: Settings,
    date: dt.date,
    *,
    release_folder: Path,
    features_folder: Path,
    truth_dir: Path | None,
    out: Path,
    peers: Peers | None = None,
) -> dict[str, Any]:
    """Replay D with the release in ``release_folder`` and write ``out/replay.{json,png,md}``.

    With the simulator's world (``truth_dir``): every comparator against the truth. Without it:
    the funnel recall of D's clicks through the release's candidate stage. Either way the served
    candidate list's recall is reported. Returns the report (``summary`` holds the flat numbers
    the run logs)."""
    from pipelines.retrieval_eval import _world, training_counts
    from serving.release import load_release

    cfg = settings.lifecycle
    eval_rows = pd.read_parquet(Path(features_folder) / "eval")
    release = load_release(Path(release_folder), settings)
    try:
        k = settings.serving.default_candidates
        funnel = funnel_recall(
            release,
            eval_rows,
            sorted({kk for kk in (100, 500) if kk <= k} | {k}),
            queries=cfg.recall_queries,
        )
        world = _world(truth_dir)
        report: dict[str, Any]
        if world is None:
            report = {"date": date.isoformat(), "release": release.version, "systems": {}}
        else:
            requests = sample_requests(eval_rows, cfg.replay_requests)
            report = replay(
                release,
                world,
                requests,
                date,
                counts=training_counts(Path(features_folder)),
                peers=peers,
                num_candidates=k,
                all_ads=cfg.replay_all_ads,
                bootstrap=max(cfg.eval_bootstrap, 50),
            )
    finally:
        release.close()
    report["funnel_recall"] = funnel
    summary: dict[str, float] = {
        f"funnel_recall_at_{kk}": float(v) for kk, v in funnel["recall_at_k"].items()
    }
    for name, entry in report["systems"].items():
        top = entry.get("top_10", {})
        for key in ("expected_ctr", "share_of_oracle", "x_popularity"):
            if key in top:
                summary[f"{name}_top10_{key}"] = float(top[key])
    report["summary"] = summary
    if report["systems"]:
        write_replay(report, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def render_funnel_markdown(funnel: Mapping[str, Any]) -> str:
    """The report section where no truth exists: recall of D's clicks by the served candidates."""
    cells = ", ".join(f"@{k} {v:.3f}" for k, v in funnel["recall_at_k"].items())
    return (
        f"## Funnel recall ({funnel['clicks']} clicked impressions of the evaluation day)\n\n"
        f"Share of clicked (user, ad) pairs the served candidate list holds: {cells}\n"
    )
