"""The ranking flow of one request (DESIGN.md, serving): lookup → retrieve → features → predict →
sort, against one loaded release, with per-stage timings.

Only the retrieved candidates are scored — never the whole catalogue — and nothing is trained or
embedded: known users and placements are rows of mapped tables. Known faults bend, they do not
break: an unknown user or placement gets the candidates' fallback vector and default (or
request-supplied) features; a ranker that times out or fails leaves the candidates ranked by their
retrieval score with ``degraded: true``; an empty candidate set is an empty list with a reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from candidates.service import QueryParts

from .backends import RankerError, RankerTimeout, inputs_for
from .features import RequestFieldError
from .metrics import ServingMetrics
from .release import LoadedRelease
from .schemas import RankedAd, RankRequest, RankResponse, ReleaseVersions, StageTimings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankLimits:
    """Settings-dependent request limits (the schema holds the fixed ones)."""

    default_candidates: int
    max_candidates: int
    max_exclude_ads: int
    timeout_s: float
    deadline_s: float | None = None
    """End-to-end budget of a request from its arrival (``serving.request_deadline_ms``)."""


def check_limits(request: RankRequest, limits: RankLimits) -> None:
    """Raise :class:`RequestFieldError` (→ 422) for limits that depend on settings."""
    if request.num_candidates is not None and request.num_candidates > limits.max_candidates:
        raise RequestFieldError(
            ("body", "num_candidates"),
            f"num_candidates must be at most {limits.max_candidates} (server setting)",
        )
    if len(request.exclude_ad_ids) > limits.max_exclude_ads:
        raise RequestFieldError(
            ("body", "exclude_ad_ids"),
            f"exclude_ad_ids may hold at most {limits.max_exclude_ads} ids",
        )


@dataclass
class Prepared:
    """A request up to the ranker call: its candidates, their ranker inputs (None when there
    are no candidates) and the clock at each stage's end."""

    found: Any
    gathered: Any
    fallbacks: list[str]
    reason: str | None
    started: float
    t_lookup: float
    t_retrieve: float
    t_features: float


def prepare(release: LoadedRelease, request: RankRequest, limits: RankLimits) -> Prepared:
    """Lookup, retrieval and feature assembly of ``request`` (the stages before the ranker).

    Raises:
        RequestFieldError: request features or settings-dependent limits do not fit (→ 422).
    """
    clock = time.perf_counter
    started = clock()
    features = release.features
    check_limits(request, limits)
    user_features = features.check_request_features("user", request.user_features, "user_features")
    context_features = features.check_request_features(
        "context", request.context_features, "context_features"
    )
    # One lookup per request: the candidate stage's rows are reused by feature assembly.
    parts = locate(release.candidates, request.user_id, request.placement_id)
    lookup = features.lookup(request.user_id, request.placement_id, parts)
    t_lookup = clock()

    k = request.num_candidates or limits.default_candidates
    found = release.candidates.candidates(
        request.user_id, request.placement_id, k, exclude=request.exclude_ad_ids, parts=parts
    )
    fallbacks = [f"{entity}_vector" for entity in found.fallbacks]
    t_retrieve = clock()

    if not len(found):
        reason = "no candidates: every ad of the catalogue was excluded or none is indexed"
        fallbacks.append("empty_candidates")
        return Prepared(found, None, fallbacks, reason, started, t_lookup, t_retrieve, clock())
    gathered = features.gather(
        request.user_id,
        request.placement_id,
        found,
        lookup=lookup,
        request_time=request.request_time,
        user_features=user_features,
        context_features=context_features,
    )
    fallbacks.extend(gathered.fallbacks)
    return Prepared(found, gathered, fallbacks, None, started, t_lookup, t_retrieve, clock())


def rank(
    release: LoadedRelease, request: RankRequest, limits: RankLimits, metrics: ServingMetrics
) -> RankResponse:
    """Rank ads for ``request`` with ``release`` (which the caller holds for the whole request,
    so a concurrent release swap never mixes two releases in one answer).

    Raises:
        RequestFieldError: request features or settings-dependent limits do not fit (→ 422).
    """
    ready = prepare(release, request, limits)
    pctr, failure = None, None
    if ready.gathered is not None:
        backend = release.backend
        try:
            pctr = backend.predict(
                ready.gathered.common,
                inputs_for(backend, ready.gathered.candidates),
                timeout_s=limits.timeout_s,
            )
        except RankerError as exc:
            failure = exc
    return answer(release, request, ready, pctr, failure, metrics)


async def rank_async(
    release: LoadedRelease, request: RankRequest, limits: RankLimits, metrics: ServingMetrics
) -> RankResponse:
    """:func:`rank` for the API's event loop: the stages before and after the ranker run on
    the loop, the ranker call is awaited (the loop serves other requests meanwhile). Same
    stages, same answer."""
    ready = prepare(release, request, limits)
    pctr, failure = None, None
    if ready.gathered is not None:
        backend = release.backend
        try:
            pctr = await backend.predict_async(
                ready.gathered.common,
                inputs_for(backend, ready.gathered.candidates),
                timeout_s=limits.timeout_s,
            )
        except RankerError as exc:
            failure = exc
    return answer(release, request, ready, pctr, failure, metrics)


def answer(
    release: LoadedRelease,
    request: RankRequest,
    ready: Prepared,
    pctr: np.ndarray | None,
    failure: RankerError | None,
    metrics: ServingMetrics,
) -> RankResponse:
    """The response: candidates sorted by ``pctr`` (by retrieval score when the ranker failed
    or timed out: ``degraded``), the top ``num_ads`` decoded, per-stage timings recorded."""
    clock = time.perf_counter
    t_predict = clock()
    found, fallbacks, reason = ready.found, ready.fallbacks, ready.reason
    degraded = failure is not None
    if isinstance(failure, RankerTimeout):
        reason = f"ranker timed out; ranked by retrieval score ({failure})"
        metrics.degraded.labels("timeout").inc()
    elif failure is not None:
        reason = f"ranker failed; ranked by retrieval score ({failure})"
        metrics.degraded.labels("error").inc()
        log.warning("ranker failed, answering degraded: %s", failure)
    if ready.gathered is None:
        t_predict = ready.t_features
    retrieval = np.asarray(found.scores, dtype=np.float64)
    keys = retrieval if pctr is None else pctr.astype(np.float64)
    # Highest first; ties broken by retrieval score, then by the retrieval order (stable).
    order = np.lexsort((-retrieval, -keys))[: request.num_ads]
    ads = [  # ids decoded only for the ads answered
        RankedAd(
            ad_id=found.ad_id(i),
            pctr=None if pctr is None else float(pctr[i]),
            score=float(keys[i]),
            retrieval_score=float(retrieval[i]),
            source=found.source(i),
        )
        for i in order
    ]
    t_sort = clock()

    for kind in fallbacks:
        metrics.fallbacks.labels(kind).inc()
    metrics.candidates.observe(len(found))
    stages = {
        "lookup": ready.t_lookup - ready.started,
        "retrieve": ready.t_retrieve - ready.t_lookup,
        "features": ready.t_features - ready.t_retrieve,
        "predict": t_predict - ready.t_features,
        "sort": t_sort - t_predict,
        "total": t_sort - ready.started,
    }
    for stage, seconds in stages.items():
        metrics.stage[stage].observe(seconds)
    return RankResponse(
        ads=ads,
        versions=ReleaseVersions(**release.versions),
        backend=release.backend.kind,
        candidates_considered=len(found),
        fallbacks=fallbacks,
        degraded=degraded,
        reason=reason,
        timings_ms=StageTimings(**{k: round(v * 1000.0, 3) for k, v in stages.items()}),
    )


def locate(service: Any, user_id: str, placement_id: str) -> QueryParts | None:
    """The candidate stage's query parts, when it can say them (a swapped-in candidate stage,
    e.g. the replay's fixed lists, cannot: feature assembly then looks the rows up itself)."""
    return service.locate(user_id, placement_id) if hasattr(service, "locate") else None
