"""The ranking API: FastAPI app factory, routes and their dependencies.

Routes: ``POST /v1/rank`` (the request flow of ``serving.ranking``), ``GET /healthz`` (the process
is alive), ``GET /readyz`` (a release is loaded and its ranker answers), ``GET /metrics``
(Prometheus), ``GET /v1/release`` (what is being served). The current release, the settings, the
limits and the metrics reach routes through ``Depends`` (STYLE.md §7), so tests can build an app
around any holder without patching globals; ``/v1/rank``'s route class (:class:`RankRoute`)
resolves the same parameters itself, without FastAPI's generic per-request machinery.

Guards in front of the routes, as pure ASGI middleware (cheaper than ``BaseHTTPMiddleware``):
request bodies above ``serving.max_body_bytes`` are answered 413 before parsing (declared or
streamed), and every request is counted by route template and status. Errors always carry an
explicit status and reason: 422 names the offending field, 503 says no release is loaded, and an
unexpected exception is a counted 500 with a generic message (details go to the log only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepclick.settings import Settings

from .backends import RankerError
from .features import RequestFieldError
from .metrics import ServingMetrics
from .ranking import RankLimits, rank_async
from .release import LoadedRelease
from .reloader import ReleaseHolder, Reloader
from .schemas import Problem, RankRequest, RankResponse, Readiness, ReleaseInfo

log = logging.getLogger(__name__)

ROUTES_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
ADMITTED_PATHS = frozenset({"/v1/rank"})
ARRIVED = "deepclick.arrived"
"""Scope key: ``time.perf_counter()`` when the request reached the app (the deadline's start)."""
RETRY_AFTER = ((b"retry-after", b"1"),)
DISCONNECTED = 499
"""Status counted for a request whose client disconnected before any answer (nginx's code): a
client going away is not a server error, and must not fire a 5xx alert."""
READINESS_DEADLINE_S = 1.0
"""Least time a readiness probe gives the ranker: readiness asks "does it answer", not "is it
fast" — a momentarily busy ranker must not take the worker out of rotation (degraded answers
cover slowness)."""


# --------------------------------------------------------------------------- middleware


class BodyLimitMiddleware:
    """Answer 431 to requests whose headers exceed ``max_header_bytes``, 413 to request bodies
    over ``limit`` bytes, declared (``content-length``) or streamed (chunked), and 408 to a body
    not received within ``body_timeout_s`` — all before the app parses anything; smaller bodies
    are buffered and replayed. A client that disconnects mid-body gets nothing (counted 499)."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        *,
        body_timeout_s: float = 5.0,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self.app = app
        self.limit = limit
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            await _problem(send, 431, f"request headers larger than {self.max_header_bytes} bytes")
            return
        if scope["method"] not in ROUTES_WITH_BODY:
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
        try:
            # a deadline on the loop's clock, not ``wait_for``: that wraps every receive in a
            # task of its own (measured: ~0.1 ms of CPU per request in this middleware)
            async with asyncio.timeout(self.body_timeout_s):
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
        except TimeoutError:
            await _problem(send, 408, f"request body not received within "
                           f"{self.body_timeout_s:g} s")  # fmt: skip
            return
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


class AdmissionMiddleware:
    """Overload is answered, not queued (issue 12, item 7): at most ``max_in_flight`` requests
    to ``paths`` run at once in this worker; the next one gets an immediate 503 with
    ``Retry-After`` (counted as ``deepclick_rejected{reason="overload"}``) instead of waiting in
    the thread pool's queue. It also stamps each request's arrival time (``ARRIVED`` in the
    scope), from which the route enforces the end-to-end deadline. One event loop per worker, so
    a plain counter is exact."""

    def __init__(
        self, app: ASGIApp, metrics: ServingMetrics, max_in_flight: int, paths: frozenset[str]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.paths = paths
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        scope[ARRIVED] = time.perf_counter()
        if self.in_flight >= self.max_in_flight:
            self.metrics.rejected.labels("overload").inc()
            await _problem(
                send, 503, f"overloaded: {self.in_flight} requests in progress; retry shortly",
                headers=RETRY_AFTER, close=False,
            )  # fmt: skip
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        done = False

        def leave() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()

        async def send_and_leave(message: Message) -> None:
            # Leave as the last byte goes out: the client's next request may arrive before
            # this coroutine returns, and must not count this one as still in flight.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                leave()
            await send(message)

        try:
            await self.app(scope, receive, send_and_leave)
        finally:
            leave()


async def _problem(
    send: Send,
    status: int,
    detail: str,
    *,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    close: bool = True,
) -> None:
    """An error answer from middleware; ``close`` ends the connection (the body was not read)."""
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *([(b"connection", b"close")] if close else []),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Count every request by route template (bounded label values) and status, with latency."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}
        """(route, status) → its counter and latency series, resolved once (bounded keys)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = DISCONNECTED  # no answer was started: the client went away first

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = 500 if status == DISCONNECTED else status
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or _known_path(scope["path"])
            series = self._series.get((route, status))
            if series is None:
                series = self._series[(route, status)] = (
                    self.metrics.requests.labels(route, str(status)),
                    self.metrics.request_seconds.labels(route),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - started)


def _known_path(path: str) -> str:
    """A label for requests answered before routing (middleware): the path when it is one of
    ours, else ``unmatched`` (bounded label values)."""
    return path if path in KNOWN_PATHS else "unmatched"


KNOWN_PATHS = frozenset({"/v1/rank", "/v1/release", "/readyz", "/healthz", "/metrics"})


# --------------------------------------------------------------------------- dependencies


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


async def get_limits(request: Request) -> RankLimits:
    return request.app.state.limits


async def get_holder(request: Request) -> ReleaseHolder:
    return request.app.state.holder


def current_release(request: Request) -> LoadedRelease:
    """The release this request runs on, taken once: a swap during the request does not change
    it. 503 while none is loaded (start-up, or every release so far was refused)."""
    release = request.app.state.holder.current
    if release is None:
        reloader: Reloader | None = request.app.state.reloader
        reason = reloader.last_error if reloader is not None and reloader.last_error else None
        raise HTTPException(
            status_code=503,
            detail=f"no release is loaded yet{': ' + reason if reason else ''}",
            headers={"Retry-After": "1"},  # the release watcher tries again within seconds
        )
    return release


async def get_release(request: Request) -> LoadedRelease:
    return current_release(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
LimitsDep = Annotated[RankLimits, Depends(get_limits)]
HolderDep = Annotated[ReleaseHolder, Depends(get_holder)]
ReleaseDep = Annotated[LoadedRelease, Depends(get_release)]


# --------------------------------------------------------------------------- routes

ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": Problem, "description": "request body not received in time"},
    413: {"model": Problem, "description": "request body too large"},
    422: {"model": Problem, "description": "invalid request; detail names the field"},
    431: {"model": Problem, "description": "request headers too large"},
    503: {
        "model": Problem,
        "description": "no release loaded, or overloaded (with Retry-After): retry shortly",
    },
}


def parse_rank_request(body: bytes) -> RankRequest:
    """``body`` as a :class:`RankRequest`, parsed and validated in one pass by pydantic's JSON
    validator; a 422 (``RequestValidationError``, each error located under ``body`` as FastAPI
    does for a declared body) names what is wrong, malformed JSON included (``json_invalid``)."""
    try:
        return RankRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


async def rank_ads(
    body: RankRequest,
    release: ReleaseDep,
    limits: LimitsDep,
    metrics: MetricsDep,
    request: Request,
) -> Response:
    """Rank ads for one user on one placement (lookup → ANN + popular → ranker → sort).

    ``async``, on the worker's event loop: the stages before and after the ranker run here and
    the ranker call is awaited (``rank_async``), so a request costs no thread-pool hop of its
    own and the loop keeps serving others while the ranker works (a plain ``def`` ran on
    FastAPI's thread pool: the app's CPU per request, answer aside, was 0.59 ms, now 0.21 ms;
    ``bench.serving --framework-split``). The answer is a :class:`RankResponse` serialised here
    once (no second validation by FastAPI). Its parameters are resolved by :class:`RankRoute`.

    The end-to-end deadline (``serving.request_deadline_ms`` from arrival) is enforced here: a
    request that already waited past it is answered 503 (``deepclick_rejected{reason=
    "deadline"}``), and the ranker gets at most what is left of it, so a degraded answer still
    comes back within the deadline.
    """
    arrived = request.scope.get(ARRIVED)
    if arrived is not None and limits.deadline_s is not None:
        left = limits.deadline_s - (time.perf_counter() - arrived)
        if left <= 0:
            metrics.rejected.labels("deadline").inc()
            raise HTTPException(
                status_code=503,
                detail="overloaded: the request waited past its deadline; retry shortly",
                headers={"Retry-After": "1"},
            )
        if left < limits.timeout_s:
            limits = dataclasses.replace(limits, timeout_s=left)
    try:
        answer = await rank_async(release, body, limits, metrics)
    except RequestFieldError as exc:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": list(exc.field_path), "msg": str(exc), "type": "value_error"}],
        ) from None
    return Response(content=answer.model_dump_json(), media_type="application/json")


class RankRoute(APIRoute):
    """The route of :func:`rank_ads`: a FastAPI route for everything but the per-request
    resolution of its parameters, which it does itself.

    FastAPI's generic request handling (dependency solving, reading the body as Python objects
    with ``json.loads`` and validating them, two exit stacks, an exception wrapper per request)
    cost ~0.1 ms of CPU per request beside a ~1.1 ms ranking (issue 14; ``bench.serving
    --framework-split``). Here the body is parsed and validated in one pass
    (:func:`parse_rank_request`) and the three dependencies are what their ``Depends`` functions
    return, read directly. The endpoint, its signature (the OpenAPI schema is built from it, as
    for any route), the method check (405) and the errors (422 and 503 through the app's
    exception handlers, which see the same exceptions) are FastAPI's.
    """

    PARAMETERS = ("body", "release", "limits", "metrics", "request")

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        names = tuple(inspect.signature(endpoint).parameters)
        if names != self.PARAMETERS:
            raise TypeError(
                f"RankRoute resolves {self.PARAMETERS}; {endpoint.__name__} takes {names}"
            )
        super().__init__(path, endpoint, **kwargs)
        self.app = self.serve

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        state = request.app.state
        release = current_release(request)  # 503 before the body is read, as FastAPI did
        body = parse_rank_request(await request.body())
        response = await self.endpoint(body, release, state.limits, state.metrics, request)
        await response(scope, receive, send)


async def healthz() -> dict[str, str]:
    """The process is alive (says nothing about releases)."""
    return {"status": "alive"}


def readyz(holder: HolderDep, request: Request, settings: SettingsDep) -> JSONResponse:
    """Readiness means "can answer" (issue 12): 200 whenever a release is loaded. When its
    ranker does not answer a one-candidate request (within ``READINESS_DEADLINE_S`` at least)
    the status is ``degraded`` — still 200, because ``/v1/rank`` still answers (in retrieval
    order), and a probe that pulled every replica would turn a degraded service into an outage.
    ``note`` says when the release is a last-known-good fallback or was loaded degraded. 503
    only while no release is loaded."""
    release = holder.current
    reloader: Reloader | None = request.app.state.reloader
    note = reloader.note if reloader is not None else None
    if release is None:
        detail = (reloader.last_error if reloader else None) or "no release loaded yet"
        body = Readiness(status="not ready", detail=detail)
        return JSONResponse(body.model_dump(), status_code=503)
    deadline = max(settings.predictor.timeout_ms / 1000.0, READINESS_DEADLINE_S)
    try:
        release.backend.predict(release.probe.common, release.probe.candidates, timeout_s=deadline)
    except RankerError as exc:
        body = Readiness(
            status="degraded", release=release.version, detail=f"ranker: {exc}", note=note
        )
        return JSONResponse(body.model_dump())
    return JSONResponse(Readiness(status="ready", release=release.version, note=note).model_dump())


async def metrics_endpoint(metrics: MetricsDep) -> Response:
    content, media_type = metrics.render()
    return Response(content=content, media_type=media_type)


async def release_info(release: ReleaseDep, request: Request) -> ReleaseInfo:
    """The versions, backend and sizes of the release being served, and ``note`` when it is not
    plainly CURRENT's (a last-known-good fallback, a degraded start)."""
    reloader: Reloader | None = request.app.state.reloader
    return ReleaseInfo(**release.describe(), note=reloader.note if reloader else None)


def _printable(value: Any) -> Any:
    """A JSON-safe copy of an error field: non-finite floats as text, lone surrogates escaped
    (the client's own input, echoed naively, made the error answer itself fail with a 500)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return _printable(str(value))


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each offending field (``loc``, ``msg``, ``type``) without echoing the input:
    the input may hold what JSON cannot encode (NaN, 1e400, ``"\\ud800"``)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {
            "loc": [_printable(part) for part in error.get("loc", ())],
            "msg": _printable(error.get("msg", "")),
            "type": _printable(error.get("type", "")),
        }
        for error in errors
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS threads in this worker (0 keeps the library's default). The candidate
    stage's exact search is one BLAS call per request; with one worker per core, a BLAS that
    also starts a thread per core oversubscribes the machine (measured under load: 16 ms per
    100k x 32 scan with 2 threads vs 3.6 ms with 1)."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")


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
    limit_blas_threads(settings.serving.blas_threads)
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
        deadline_s=settings.serving.request_deadline_ms / 1000.0,
    )

    app.router.add_api_route(  # the app's add_api_route takes no route class
        "/v1/rank", rank_ads, methods=["POST"], response_model=None, tags=["ranking"],
        responses={200: {"model": RankResponse, "description": "ranked ads"}, **ERRORS},
        route_class_override=RankRoute,
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
    app.add_exception_handler(RequestValidationError, invalid_request)
    # Last added = outermost: count everything, including 413s; admit before reading bodies.
    serving = settings.serving
    app.add_middleware(
        BodyLimitMiddleware, limit=serving.max_body_bytes, body_timeout_s=serving.body_timeout_s,
        max_header_bytes=serving.max_header_bytes,
    )  # fmt: skip
    app.add_middleware(
        AdmissionMiddleware, metrics=metrics, max_in_flight=serving.max_in_flight,
        paths=ADMITTED_PATHS,
    )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
