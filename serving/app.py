"""The ranking API: FastAPI app factory, routes and their dependencies.

Routes: ``POST /v1/rank`` (the request flow of ``serving.ranking``), ``GET /healthz`` (the process
is alive), ``GET /readyz`` (a release is loaded and its ranker answers), ``GET /metrics``
(Prometheus), ``GET /v1/release`` (what is being served). The current release, the settings, the
limits and the metrics reach routes through ``Depends`` (STYLE.md §7), so tests can build an app
around any holder without patching globals.

Guards in front of the routes, as pure ASGI middleware (cheaper than ``BaseHTTPMiddleware``):
request bodies above ``serving.max_body_bytes`` are answered 413 before parsing (declared or
streamed), and every request is counted by route template and status. Errors always carry an
explicit status and reason: 422 names the offending field, 503 says no release is loaded, and an
unexpected exception is a counted 500 with a generic message (details go to the log only).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepclick.settings import Settings

from .backends import RankerError
from .features import RequestFieldError
from .metrics import ServingMetrics
from .ranking import RankLimits, rank
from .release import LoadedRelease
from .reloader import ReleaseHolder, Reloader
from .schemas import Problem, RankRequest, RankResponse, Readiness, ReleaseInfo

log = logging.getLogger(__name__)

ROUTES_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
READINESS_DEADLINE_S = 1.0
"""Least time a readiness probe gives the ranker: readiness asks "does it answer", not "is it
fast" — a momentarily busy ranker must not take the worker out of rotation (degraded answers
cover slowness)."""


# --------------------------------------------------------------------------- middleware


class BodyLimitMiddleware:
    """Answer 413 to request bodies over ``limit`` bytes, declared (``content-length``) or
    streamed (chunked), before the app parses them; smaller bodies are buffered and replayed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ROUTES_WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await _problem(send, 400, "invalid content-length header")
                return
            if too_big:
                await self._reject(send)
                return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        await _problem(send, 413, f"request body larger than {self.limit} bytes")


async def _problem(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Count every request by route template (bounded label values) and status, with latency."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- dependencies


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


async def get_limits(request: Request) -> RankLimits:
    return request.app.state.limits


async def get_holder(request: Request) -> ReleaseHolder:
    return request.app.state.holder


async def get_release(request: Request) -> LoadedRelease:
    """The release this request runs on, taken once: a swap during the request does not change
    it. 503 while none is loaded (start-up, or every release so far was refused)."""
    release = request.app.state.holder.current
    if release is None:
        reloader: Reloader | None = request.app.state.reloader
        reason = reloader.last_error if reloader is not None and reloader.last_error else None
        raise HTTPException(
            status_code=503,
            detail=f"no release is loaded yet{': ' + reason if reason else ''}",
        )
    return release


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
LimitsDep = Annotated[RankLimits, Depends(get_limits)]
HolderDep = Annotated[ReleaseHolder, Depends(get_holder)]
ReleaseDep = Annotated[LoadedRelease, Depends(get_release)]


# --------------------------------------------------------------------------- routes

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "request body too large"},
    422: {"model": Problem, "description": "invalid request; detail names the field"},
    503: {"model": Problem, "description": "no release loaded"},
}


def rank_ads(
    body: RankRequest, release: ReleaseDep, limits: LimitsDep, metrics: MetricsDep
) -> Response:
    """Rank ads for one user on one placement (lookup → ANN + popular → ranker → sort).

    A plain ``def``: FastAPI runs it on its thread pool, where ANNOY and TensorFlow release the
    GIL, so concurrent requests overlap. The answer is a :class:`RankResponse` serialised here
    once; letting FastAPI re-validate it would cost a second thread-pool hop per request.
    """
    try:
        answer = rank(release, body, limits, metrics)
    except RequestFieldError as exc:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": list(exc.field_path), "msg": str(exc), "type": "value_error"}],
        ) from None
    return Response(content=answer.model_dump_json(), media_type="application/json")


async def healthz() -> dict[str, str]:
    """The process is alive (says nothing about releases)."""
    return {"status": "alive"}


def readyz(holder: HolderDep, request: Request, settings: SettingsDep) -> JSONResponse:
    """Ready when a release is loaded and its ranker answers a one-candidate request (within
    ``READINESS_DEADLINE_S`` at least)."""
    release = holder.current
    if release is None:
        reloader: Reloader | None = request.app.state.reloader
        detail = (reloader.last_error if reloader else None) or "no release loaded yet"
        body = Readiness(status="not ready", detail=detail)
        return JSONResponse(body.model_dump(), status_code=503)
    deadline = max(settings.predictor.timeout_ms / 1000.0, READINESS_DEADLINE_S)
    try:
        release.backend.predict(release.probe.common, release.probe.candidates, timeout_s=deadline)
    except RankerError as exc:
        body = Readiness(status="not ready", release=release.version, detail=str(exc))
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready", release=release.version).model_dump())


async def metrics_endpoint(metrics: MetricsDep) -> Response:
    content, media_type = metrics.render()
    return Response(content=content, media_type=media_type)


async def release_info(release: ReleaseDep) -> ReleaseInfo:
    """The versions, backend and sizes of the release being served."""
    return ReleaseInfo(**release.describe())


def create_app(
    settings: Settings,
    *,
    holder: ReleaseHolder | None = None,
    watch: bool = True,
    metrics: ServingMetrics | None = None,
) -> FastAPI:
    """The ranking API for ``settings``.

    With ``watch`` (the default) a background watcher loads ``<root>/releases/CURRENT`` at start-up
    and follows it (``serving.reloader``); ``/readyz`` answers 503 until the first release is
    loaded. ``holder`` lets a caller (a test, a benchmark) serve a release it loaded itself.
    """
    metrics = metrics or ServingMetrics()
    holder = holder or ReleaseHolder()
    reloader = Reloader(settings, holder, metrics) if watch else None
    if holder.current is not None:
        metrics.set_release(holder.current.versions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if reloader is not None:
            reloader.start()
        try:
            yield
        finally:
            if reloader is not None:
                reloader.stop()

    app = FastAPI(
        title="deepclick ranking API",
        version="1",
        description="Ranks ads for a user on a placement: ANN candidates scored by a CTR model.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.holder = holder
    app.state.reloader = reloader
    app.state.limits = RankLimits(
        default_candidates=min(
            settings.serving.default_candidates, settings.serving.max_candidates
        ),
        max_candidates=settings.serving.max_candidates,
        max_exclude_ads=settings.serving.max_exclude_ads,
        timeout_s=settings.predictor.timeout_ms / 1000.0,
    )

    app.add_api_route(
        "/v1/rank", rank_ads, methods=["POST"], response_model=None, tags=["ranking"],
        responses={200: {"model": RankResponse, "description": "ranked ads"}, **ERRORS},
    )  # fmt: skip
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["operations"])
    app.add_api_route(
        "/readyz", readyz, methods=["GET"], response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready"}}, tags=["operations"],
    )  # fmt: skip
    app.add_api_route(
        "/metrics", metrics_endpoint, methods=["GET"], tags=["operations"],
        response_class=Response,
    )  # fmt: skip
    app.add_api_route(
        "/v1/release", release_info, methods=["GET"], response_model=ReleaseInfo,
        responses={503: ERRORS[503]}, tags=["operations"],
    )  # fmt: skip

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels(type(exc).__name__).inc()
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error (logged)"}, status_code=500)

    app.add_exception_handler(Exception, unexpected)
    # Last added = outermost: count everything, including 413s.
    app.add_middleware(BodyLimitMiddleware, limit=settings.serving.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
