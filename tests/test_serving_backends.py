"""Ranker backends over real loopback sockets: TF Serving's gRPC ``PredictionService`` and REST
``:predict`` contracts (served by serving.model_server around the exported SavedModel) must give
the in-process predictions, with either signature, and fail fast and typed when the ranker is slow
or gone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from serving_world import MODEL, World

from deepclick.settings import PredictorSettings
from serving.backends import (
    GrpcBackend,
    InProcessBackend,
    RankerError,
    RankerRef,
    RankerTimeout,
    RestBackend,
    create_backend,
    signature_inputs,
)
from serving.features import Gathered
from serving.model_server import ModelStore, start_grpc_server, start_rest_server
from serving.release import LoadedRelease
from serving.schemas import RankRequest

SIGNATURES = ("rank", "serving_default")


@pytest.fixture(scope="module")
def request_300(loaded: LoadedRelease) -> Gathered:
    """A real 300-candidate request for a known user and placement."""
    found = loaded.candidates.candidates("u00010", "p003", 300)
    lookup = loaded.features.lookup("u00010", "p003")
    return loaded.features.gather("u00010", "p003", found.ad_ids, lookup=lookup)


@pytest.fixture(scope="module")
def store(world: World) -> ModelStore:
    return ModelStore({(MODEL, world.ranker.name): world.ranker})


@pytest.fixture
def grpc_target(store: ModelStore) -> Iterator[str]:
    server, port = start_grpc_server(store)
    store.delay_s = 0.0
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def rest_target(store: ModelStore) -> Iterator[str]:
    server, port = start_rest_server(store)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def _ref(world: World) -> RankerRef:
    return RankerRef(MODEL, world.ranker.name, world.ranker)


def _settings(**kwargs: object) -> PredictorSettings:
    return PredictorSettings(**{"timeout_ms": 10_000, **kwargs})


def _mixed_requests() -> list[RankRequest]:
    """Known and new users and placements, 200 candidates each: the batched paths' cases."""
    return [
        RankRequest(user_id=u, placement_id=p, num_ads=50, num_candidates=200)
        for u, p in (("u00010", "p003"), ("u00002", "p001"), ("new-user", "p000"),
                     ("u00031", "new-place"), ("u00007", "p002"), ("u00019", "p003"))
    ]  # fmt: skip


def test_signature_inputs_send_common_features_once_or_per_candidate() -> None:
    common = {"user_id": np.array([b"u1"], dtype="S")}
    candidates = {"ad_id": np.array([b"a", b"b", b"c"], dtype="S")}
    assert signature_inputs("rank", common, candidates, 3)["user_id"].tolist() == [b"u1"]
    repeated = signature_inputs("serving_default", common, candidates, 3)["user_id"]
    assert repeated.tolist() == [b"u1", b"u1", b"u1"]


@pytest.mark.parametrize("signature", SIGNATURES)
def test_grpc_backend_equals_in_process(
    world: World, loaded: LoadedRelease, request_300: Gathered, grpc_target: str, signature: str
) -> None:
    # the transport against the same SavedModel call; the served TFLite call to its 1e-5
    local = InProcessBackend(_ref(world), _settings(signature="rank", tflite=False))
    expected = local.predict(request_300.common, request_300.candidates)
    remote = create_backend(
        _ref(world), _settings(backend="grpc", target=grpc_target, signature=signature)
    )
    assert isinstance(remote, GrpcBackend)
    got = remote.predict(request_300.common, request_300.candidates)
    assert got.shape == (len(request_300.candidates["ad_id"]),)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    served = loaded.backend.predict(request_300.common, request_300.candidates)
    np.testing.assert_allclose(got, served, rtol=0, atol=1e-5)
    local.close()


@pytest.mark.parametrize("signature", SIGNATURES)
def test_rest_backend_equals_in_process(
    world: World, loaded: LoadedRelease, request_300: Gathered, rest_target: str, signature: str
) -> None:
    local = InProcessBackend(_ref(world), _settings(signature="rank", tflite=False))
    expected = local.predict(request_300.common, request_300.candidates)
    local.close()
    remote = create_backend(
        _ref(world), _settings(backend="rest", target=rest_target, signature=signature)
    )
    assert isinstance(remote, RestBackend)
    got = remote.predict(request_300.common, request_300.candidates)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)  # JSON: 9 digits
    served = loaded.backend.predict(request_300.common, request_300.candidates)
    np.testing.assert_allclose(got, served, rtol=0, atol=1e-5)  # the TFLite call


def test_remote_backends_name_the_release_version(
    world: World, request_300: Gathered, grpc_target: str, rest_target: str
) -> None:
    missing = RankerRef(MODEL, "19990101", world.ranker)
    for kind, target in (("grpc", grpc_target), ("rest", rest_target)):
        backend = create_backend(missing, _settings(backend=kind, target=target))
        with pytest.raises(RankerError, match="19990101"):
            backend.predict(request_300.common, request_300.candidates)


def test_slow_grpc_ranker_times_out_at_the_deadline(
    world: World, store: ModelStore, request_300: Gathered, grpc_target: str
) -> None:
    backend = create_backend(_ref(world), _settings(backend="grpc", target=grpc_target))
    store.delay_s = 2.0
    started = time.perf_counter()
    with pytest.raises(RankerTimeout, match="within 80 ms"):
        backend.predict(request_300.common, request_300.candidates, timeout_s=0.08)
    assert time.perf_counter() - started < 1.0  # the deadline, not the 2 s sleep
    store.delay_s = 0.0


def test_slow_rest_ranker_times_out_at_the_deadline(
    world: World, store: ModelStore, request_300: Gathered, rest_target: str
) -> None:
    backend = create_backend(_ref(world), _settings(backend="rest", target=rest_target))
    store.delay_s = 2.0
    try:
        started = time.perf_counter()
        with pytest.raises(RankerTimeout):
            backend.predict(request_300.common, request_300.candidates, timeout_s=0.08)
        assert time.perf_counter() - started < 1.0
    finally:
        store.delay_s = 0.0


def test_stopped_grpc_server_fails_fast_with_a_ranker_error(
    world: World, store: ModelStore, request_300: Gathered
) -> None:
    server, port = start_grpc_server(store)
    backend = create_backend(_ref(world), _settings(backend="grpc", target=f"127.0.0.1:{port}"))
    assert backend.predict(request_300.common, request_300.candidates).size
    server.stop(grace=None).wait()
    started = time.perf_counter()
    with pytest.raises(RankerError, match="UNAVAILABLE"):
        backend.predict(request_300.common, request_300.candidates, timeout_s=5.0)
    assert time.perf_counter() - started < 2.0  # refused at once, not at the deadline


def test_in_process_deadline_and_failure_are_typed(
    world: World, loaded: LoadedRelease, request_300: Gathered
) -> None:
    backend = InProcessBackend(_ref(world), _settings())
    with pytest.raises(RankerTimeout):
        backend.predict(request_300.common, request_300.candidates, timeout_s=1e-6)
    broken = dict(request_300.candidates)
    del broken["ad__price"]
    with pytest.raises(RankerError, match="ad__price"):
        backend.predict(request_300.common, broken)
    backend.close()


def test_unknown_backend_is_refused(world: World) -> None:
    settings = PredictorSettings.model_construct(backend="carrier-pigeon", signature="rank")
    with pytest.raises(ValueError, match="unknown predictor backend 'carrier-pigeon'"):
        create_backend(_ref(world), settings)


def test_batched_path_gives_the_rankings_of_the_one_request_path(loaded: LoadedRelease) -> None:
    """Micro-batching (issue 14, item 4): concurrent requests scored in shared
    ``serving_default`` calls rank every request's ads as the one-request ``rank`` call does."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from serving.batching import BatchingBackend
    from serving.metrics import ServingMetrics
    from serving.ranking import RankLimits, rank

    requests = _mixed_requests()
    limits = RankLimits(200, 500, 0, timeout_s=30.0)
    metrics = ServingMetrics()
    alone = [rank(loaded, r, limits, metrics) for r in requests]
    batcher = BatchingBackend(loaded.backend, max_rows=2000, max_wait_ms=200.0)
    batched_release = dataclasses.replace(loaded, backend=batcher)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: rank(batched_release, r, limits, metrics), requests))
    assert batcher.batched_requests == len(requests) and batcher.batches < len(requests)
    for one, many in zip(alone, together, strict=True):
        assert not one.degraded and not many.degraded
        assert [a.ad_id for a in many.ads] == [a.ad_id for a in one.ads]
        np.testing.assert_allclose(
            [a.pctr for a in many.ads], [a.pctr for a in one.ads], rtol=1e-4, atol=1e-6
        )


def test_batcher_refuses_bad_settings_and_passes_a_lone_request_through(
    loaded: LoadedRelease, request_300: Gathered
) -> None:
    from serving.batching import BatchingBackend

    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        BatchingBackend(loaded.backend, max_rows=0)
    batcher = BatchingBackend(loaded.backend, max_rows=1000)
    got = batcher.predict(request_300.common, request_300.candidates, timeout_s=30)
    want = loaded.backend.predict(request_300.common, request_300.candidates, timeout_s=30)
    np.testing.assert_array_equal(got, want)  # alone: the backend's own signature, same call
    assert (batcher.batches, batcher.batched_requests) == (1, 1)


def test_awaited_in_process_call_is_the_blocking_call_and_keeps_its_deadline_and_errors(
    world: World, request_300: Gathered
) -> None:
    """The API's async route awaits the ranker (issue 14: no thread-pool hop per request): the
    same scores as the blocking call, a typed timeout at the deadline, a typed failure. The
    TFLite call runs inline while the model is free — even with the pool's only thread taken —
    and a call that finds the model busy waits on the pool no longer than its deadline."""
    import asyncio
    import threading

    backend = InProcessBackend(_ref(world), _settings(inprocess_pool=1))
    assert backend.inline and backend.predictor.lite
    common, candidates = request_300.common, request_300.candidates
    want = backend.predict(common, candidates)
    got = asyncio.run(backend.predict_async(common, candidates))
    np.testing.assert_array_equal(got, want)
    busy = threading.Event()
    backend._pool.submit(busy.wait, 30)  # the pool's one thread is taken: only inline answers
    try:
        inline = asyncio.run(backend.predict_async(common, candidates, timeout_s=5.0))
        np.testing.assert_array_equal(inline, want)
        backend._busy.acquire()  # another call holds the model: this one must use the pool
        try:
            started = time.perf_counter()
            with pytest.raises(RankerTimeout):
                asyncio.run(backend.predict_async(common, candidates, timeout_s=0.05))
            assert time.perf_counter() - started < 1.0
        finally:
            backend._busy.release()
    finally:
        busy.set()
    broken = {k: v for k, v in candidates.items() if k != "ad__price"}
    with pytest.raises(RankerError, match="ad__price"):
        asyncio.run(backend.predict_async(common, broken))
    backend.close()


def test_awaited_batched_path_gives_the_rankings_of_the_one_request_path(
    loaded: LoadedRelease,
) -> None:
    """Requests awaiting the ranker together on one event loop are scored in shared calls and
    get the rankings the one-request path gives them (issue 14, items 1 and 4)."""
    import asyncio
    import dataclasses

    from serving.batching import BatchingBackend
    from serving.metrics import ServingMetrics
    from serving.ranking import RankLimits, rank, rank_async

    requests = _mixed_requests()
    limits = RankLimits(200, 500, 0, timeout_s=30.0)
    metrics = ServingMetrics()
    alone = [rank(loaded, r, limits, metrics) for r in requests]
    batcher = BatchingBackend(loaded.backend, max_rows=2000)
    batched_release = dataclasses.replace(loaded, backend=batcher)

    async def together(requests: list[RankRequest]) -> list:
        return await asyncio.gather(
            *(rank_async(batched_release, r, limits, metrics) for r in requests)
        )

    answers = asyncio.run(together(requests))
    # every request queued before the drain task first ran: all six in one call
    assert (batcher.batches, batcher.batched_requests) == (1, len(requests))
    for one, many in zip(alone, answers, strict=True):
        assert not one.degraded and not many.degraded
        assert [a.ad_id for a in many.ads] == [a.ad_id for a in one.ads]
        np.testing.assert_allclose(
            [a.pctr for a in many.ads], [a.pctr for a in one.ads], rtol=1e-4, atol=1e-6
        )
    # The same request four times, one per call: each answer comes while identical requests
    # still wait (regression: leaving the queue compared them by value, and their arrays
    # raised — a 500 under the hot-reload test's repeated request).
    batcher = BatchingBackend(loaded.backend, max_rows=200)
    batched_release = dataclasses.replace(loaded, backend=batcher)
    in_turn = asyncio.run(together([requests[0]] * 4))
    assert (batcher.batches, batcher.batched_requests) == (4, 4)
    for turn in in_turn:
        assert not turn.degraded
        assert [a.ad_id for a in turn.ads] == [a.ad_id for a in alone[0].ads]


def test_awaited_batch_past_its_deadline_is_a_timeout_and_the_queue_moves_on(
    loaded: LoadedRelease, request_300: Gathered
) -> None:
    import asyncio

    from serving.batching import BatchingBackend

    batcher = BatchingBackend(loaded.backend, max_rows=1000)
    common, candidates = request_300.common, request_300.candidates

    async def late_then_on_time() -> np.ndarray:
        with pytest.raises(RankerTimeout, match="batched"):
            await batcher.predict_async(common, candidates, timeout_s=1e-6)
        return await batcher.predict_async(common, candidates, timeout_s=30)

    got = asyncio.run(late_then_on_time())
    want = loaded.backend.predict(common, candidates, timeout_s=30)
    np.testing.assert_array_equal(got, want)
