"""Ranker backends: one interface, three ways to get click probabilities for N candidates.

DESIGN.md: TF Serving in production, an in-process SavedModel as the embedded default. All three
take the same request — the user and context inputs once (``common``, ``[1]`` arrays) and the
candidate inputs (``[N]`` arrays) — and return ``pctr`` per candidate, or raise
:class:`RankerTimeout` / :class:`RankerError`, which the ranking flow turns into a degraded answer.

- ``in_process``: :class:`models.ranker.predictor.InProcessPredictor` on the release's ranker
  folder; the TFLite call runs inline when the model is free, anything else on a small thread
  pool so that a slow prediction still lets the request answer at its deadline.
- ``grpc``: TF Serving's ``PredictionService/Predict`` through the official
  ``PredictionServiceStub`` over one reused channel per target, with a per-call deadline.
- ``rest``: TF Serving's ``POST /v1/models/<name>/versions/<v>:predict`` (columnar ``inputs``)
  over one reused HTTP connection pool per target.

Remote backends always name the release's exact model version, so a TF Serving that has already
loaded the next version still answers the release that is being served (the release pairing holds
across the hot swap; models.config keeps two versions loaded for this).

Signatures: ``rank`` sends the user and context inputs once instead of N times; ``serving_default``
sends every input per candidate. Which one a backend uses is ``predictor.signature``; see
``bench/serving.py`` for the measured choice. Note that TF Serving's server-side batching
(``--enable_batching``) requires every input of a request to have the same 0th dimension, which
``rank`` (``[1]`` next to ``[N]``) does not have: with batching on, remote backends must use
``serving_default``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deepclick.errors import DeepclickError
from deepclick.settings import PredictorSettings
from models.ranker.inputs import CANDIDATE_INDEX

log = logging.getLogger(__name__)

OUTPUT = "pctr"
MAX_MESSAGE_BYTES = 64 * 2**20


class RankerError(DeepclickError, RuntimeError):
    """The ranker did not produce a usable answer (unreachable, refused, malformed output)."""


class RankerTimeout(RankerError):
    """The ranker did not answer within the deadline."""


@dataclass(frozen=True)
class RankerRef:
    """Which model a release ranks with: TF Serving name and version, and the exported folder."""

    model_name: str
    version: str
    folder: Path


def signature_inputs(
    signature: str, common: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray], n: int
) -> dict[str, np.ndarray]:
    """The input dict of one call: ``rank`` takes ``common`` once; ``serving_default`` repeats
    every common input per candidate."""
    if signature == "rank":
        return {**common, **candidates}
    return {**{k: np.repeat(v, n) for k, v in common.items()}, **candidates}


def rows_of(candidates: Mapping[str, np.ndarray]) -> int:
    """How many candidates a request's per-candidate inputs hold (0 without inputs)."""
    return len(next(iter(candidates.values()))) if candidates else 0


def inputs_for(backend: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` as ``backend`` takes them: the precomputed candidate rows
    (:data:`~models.ranker.inputs.CANDIDATE_INDEX`, ``[N, k]``) only for a backend that says
    ``takes_candidate_index`` (any other one — TF Serving, a replay's peer — gets the strings)."""
    if CANDIDATE_INDEX in inputs and not getattr(backend, "takes_candidate_index", False):
        return {k: v for k, v in inputs.items() if k != CANDIDATE_INDEX}
    return dict(inputs)


class RankerBackend(ABC):
    """Click probabilities for one request's candidates from one ranker version."""

    kind: ClassVar[str]
    takes_candidate_index: ClassVar[bool] = False
    """Whether requests may carry precomputed candidate rows (:meth:`candidate_index`)."""

    def __init__(self, ranker: RankerRef, settings: PredictorSettings) -> None:
        self.ranker = ranker
        self.signature: str = settings.signature
        self.timeout_s = settings.timeout_ms / 1000.0

    def predict(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """``pctr`` for each candidate, within ``timeout_s`` (default: the settings' deadline).

        Raises:
            RankerTimeout: no answer within the deadline.
            RankerError: any other failure, including an answer of the wrong length or with
                values outside [0, 1].
        """
        n = rows_of(candidates)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        inputs, timeout = self._signature_request(common, candidates, n, timeout_s)
        return self.checked_scores(self.call(inputs, timeout), n)

    async def predict_async(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """:meth:`predict` for a caller on the event loop (the API's ``async`` route): the loop
        serves other requests while the ranker works, and no thread is parked on the wait."""
        n = rows_of(candidates)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        inputs, timeout = self._signature_request(common, candidates, n, timeout_s)
        return self.checked_scores(await self.call_async(inputs, timeout), n)

    def _signature_request(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        n: int,
        timeout_s: float | None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """One request's inputs in the configured signature's form, and its deadline."""
        inputs = signature_inputs(self.signature, common, candidates, n)
        return inputs, self.timeout_s if timeout_s is None else timeout_s

    def checked_scores(self, scores: np.ndarray, n: int) -> np.ndarray:
        """``scores`` as a flat float32 array, refused (:class:`RankerError`) unless it holds
        ``n`` probabilities: a wrong-length or out-of-range answer must never be ranked."""
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape != (n,) or not np.all((scores >= 0.0) & (scores <= 1.0)):
            raise RankerError(
                f"{self.kind} ranker {self.ranker.model_name}/{self.ranker.version} returned "
                f"{scores.shape[0]} values for {n} rows (or values outside [0, 1])"
            )
        return scores

    def call(
        self, inputs: dict[str, np.ndarray], timeout_s: float, *, signature: str | None = None
    ) -> np.ndarray:
        """The raw ``pctr`` array for ``inputs`` already in ``signature``'s form (default: the
        configured one); the batcher sends ``serving_default`` rows of several requests.
        Precomputed candidate rows (:data:`~models.ranker.inputs.CANDIDATE_INDEX`) reach only a
        backend that takes them; the others get the strings alone."""
        return self._call(inputs_for(self, inputs), timeout_s, signature or self.signature)

    async def call_async(
        self, inputs: dict[str, np.ndarray], timeout_s: float, *, signature: str | None = None
    ) -> np.ndarray:
        """:meth:`call`, awaited."""
        return await self._call_async(
            inputs_for(self, inputs), timeout_s, signature or self.signature
        )

    async def _call_async(
        self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str
    ) -> np.ndarray:
        """The blocking :meth:`_call` on a worker thread (remote backends wait on a socket with
        their own deadline); a backend with a pool of its own awaits that instead."""
        return await asyncio.to_thread(self._call, inputs, timeout_s, signature)

    @abstractmethod
    def _call(self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str) -> np.ndarray:
        """Implementers send ``inputs`` with ``signature`` and return the ``pctr`` array,
        raising RankerTimeout or RankerError."""
        raise NotImplementedError("Implementers must implement _call")

    def candidate_index(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """Rows of the ranker's candidate table for these candidate string inputs, computed once
        at release load (:meth:`serving.features.FeatureAssembler.index_ads`); None (the
        default) when the backend takes only strings, as TF Serving's public signatures do."""
        return None

    def remember_values(self, column: str, values: np.ndarray) -> bool:
        """At release load: let the ranker look up every value of a shared string column once
        (e.g. the users table's ids) instead of per request; False (the default) when the
        backend takes only strings."""
        return False

    def describe(self) -> dict[str, str]:
        return {"backend": self.kind, "signature": self.signature}

    def close(self) -> None:  # noqa: B027 (optional hook; most backends hold nothing)
        """Release what this backend alone holds (shared channels stay open)."""


INLINE_MAX_ROWS = 2000
"""An awaited TFLite call of at most this many rows runs inline on the event loop (~1 ms per 500
rows); larger ones, and every other call, go through the pool with the deadline."""


class InProcessBackend(RankerBackend):
    """The exported SavedModel loaded in this worker (DESIGN.md's embedded default).

    A call through the TFLite model runs inline on the calling thread — the event loop, for the
    API's awaited call — when no other call holds the model (issue 14): it is a bounded ~1 ms
    of arithmetic for 500 rows, so the pool's hand-off and the loop's wake-up cost more than
    they protect. The deadline keeps its meaning: an inline call never queues, and one that
    took longer than the deadline is a :class:`RankerTimeout` like a late pool call; any other
    call (the SavedModel's, more than :data:`INLINE_MAX_ROWS` rows, the model busy) runs on the
    pool and is abandoned at the deadline."""

    kind = "in_process"
    takes_candidate_index = True

    def __init__(self, ranker: RankerRef, settings: PredictorSettings) -> None:
        super().__init__(ranker, settings)
        from models.ranker.predictor import InProcessPredictor

        configure_tensorflow_threads(settings.tf_threads)
        self.predictor = InProcessPredictor(ranker.folder, xla=settings.xla, lite=settings.tflite)
        self.predictor.compile()  # XLA: the common shapes now, not on a request's time
        # A few threads: enough for concurrent requests, bounded so that predictions abandoned
        # at their deadline cannot pile up without limit.
        self._pool = ThreadPoolExecutor(settings.inprocess_pool, thread_name_prefix="ranker")
        self._busy = threading.Lock()
        """Held while a call runs on the pool or inline: an inline call never waits."""
        self.inline = self.predictor.lite

    def candidate_index(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        return self.predictor.candidate_index(inputs) if self.predictor.indexed else None

    def remember_values(self, column: str, values: np.ndarray) -> bool:
        return self.predictor.remember_values(column, values) if self.predictor.indexed else False

    def describe(self) -> dict[str, str]:
        p = self.predictor
        fallback = {"tflite_fallback": p.lite_fallback} if p.lite_fallback else {}
        return {**super().describe(), "call": p.call, **fallback}

    def _predict(self, inputs: dict[str, np.ndarray], signature: str) -> np.ndarray:
        if not self.inline:  # the SavedModel call may run on several pool threads at once
            return self.predictor.predict(inputs, signature)
        with self._busy:  # the TFLite interpreter runs one call at a time anyway
            return self.predictor.predict(inputs, signature)

    def _inline(
        self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str
    ) -> np.ndarray | None:
        """The scores computed on this thread, or None when the call must go to the pool."""
        if not self.inline or max((len(v) for v in inputs.values()), default=0) > INLINE_MAX_ROWS:
            return None
        if not self._busy.acquire(blocking=False):
            return None
        started = time.perf_counter()
        try:
            scores = self.predictor.predict(inputs, signature)
        except Exception as exc:  # the model or its inputs failed: a known, degradable fault
            raise RankerError(f"in-process ranker failed: {exc}") from exc
        finally:
            self._busy.release()
        if time.perf_counter() - started > timeout_s:
            raise RankerTimeout(f"in-process ranker: no answer within {timeout_s * 1000:.0f} ms")
        return scores

    def _call(self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str) -> np.ndarray:
        scores = self._inline(inputs, timeout_s, signature)
        if scores is not None:
            return scores
        future = self._pool.submit(self._predict, inputs, signature)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            raise self._timed_out(future, timeout_s) from None
        except Exception as exc:  # the model or its inputs failed: a known, degradable fault
            raise RankerError(f"in-process ranker failed: {exc}") from exc

    async def _call_async(
        self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str
    ) -> np.ndarray:
        """Inline when the TFLite call is free and small (see the class doc), else one hop: the
        event loop awaits the pool's future (no thread waits on it)."""
        # One turn of the loop first: requests that arrived meanwhile are admitted (or refused
        # with a fast 503 past ``max_in_flight``) and deadlines fire, as at the pool's await.
        await asyncio.sleep(0)
        scores = self._inline(inputs, timeout_s, signature)
        if scores is not None:
            return scores
        future = self._pool.submit(self._predict, inputs, signature)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            raise self._timed_out(future, timeout_s) from None
        except Exception as exc:  # the model or its inputs failed: a known, degradable fault
            raise RankerError(f"in-process ranker failed: {exc}") from exc

    @staticmethod
    def _timed_out(future: Future, timeout_s: float) -> RankerTimeout:
        future.cancel()
        return RankerTimeout(f"in-process ranker: no answer within {timeout_s * 1000:.0f} ms")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def configure_tensorflow_threads(threads: int) -> None:
    """Limit TF's op thread pools (0 keeps TF's default). Only possible before TF runs its first
    op in this process; later calls are ignored (the first release's setting stays)."""
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass


_channels: dict[str, Any] = {}
_clients: dict[str, Any] = {}
_shared_lock = threading.Lock()


def grpc_channel(target: str) -> Any:
    """One channel per target per process, reused by every release and request (gRPC channels
    multiplex concurrent calls over one HTTP/2 connection and reconnect by themselves)."""
    import grpc

    with _shared_lock:
        if target not in _channels:
            _channels[target] = grpc.insecure_channel(
                target,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
        return _channels[target]


def http_client(target: str) -> Any:
    """One keep-alive connection pool per REST target per process."""
    import socket

    import httpx

    with _shared_lock:
        if target not in _clients:
            # TCP_NODELAY: the request's headers and body leave in separate writes; with Nagle
            # the body waits for the server's delayed ACK (~40 ms per call, measured).
            transport = httpx.HTTPTransport(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            _clients[target] = httpx.Client(base_url=target, transport=transport)
        return _clients[target]


def close_shared_connections() -> None:
    """Close every shared channel and client (process shutdown)."""
    with _shared_lock:
        for channel in _channels.values():
            channel.close()
        for client in _clients.values():
            client.close()
        _channels.clear()
        _clients.clear()


class GrpcBackend(RankerBackend):
    """TF Serving over gRPC: ``PredictionServiceStub.Predict`` with a per-call deadline."""

    kind = "grpc"

    def __init__(self, ranker: RankerRef, settings: PredictorSettings) -> None:
        super().__init__(ranker, settings)
        import grpc
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self._grpc = grpc
        self._types = types_pb2
        self._request_type = predict_pb2.PredictRequest
        self.target = settings.target
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc_channel(self.target))

    def _request(self, inputs: dict[str, np.ndarray], signature: str) -> Any:
        request = self._request_type()
        request.model_spec.name = self.ranker.model_name
        request.model_spec.version.value = int(self.ranker.version)
        request.model_spec.signature_name = signature
        request.output_filter.append(OUTPUT)
        for name, values in inputs.items():
            tensor = request.inputs[name]
            tensor.tensor_shape.dim.add().size = len(values)
            if values.dtype.kind == "S":
                tensor.dtype = self._types.DT_STRING
                tensor.string_val.extend(values.tolist())
            else:
                tensor.dtype = self._types.DT_FLOAT
                tensor.tensor_content = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return request

    def _call(self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str) -> np.ndarray:
        request = self._request(inputs, signature)
        try:
            response = self._stub.Predict(request, timeout=timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RankerTimeout(
                    f"gRPC ranker {self.target}: no answer within {timeout_s * 1000:.0f} ms"
                ) from None
            raise RankerError(f"gRPC ranker {self.target}: {code.name}: {exc.details()}") from None
        if OUTPUT not in response.outputs:
            raise RankerError(f"gRPC ranker {self.target}: the response has no {OUTPUT!r}")
        tensor = response.outputs[OUTPUT]
        if tensor.dtype != self._types.DT_FLOAT:
            raise RankerError(f"gRPC ranker {self.target}: {OUTPUT} is not float32")
        if tensor.tensor_content:
            return np.frombuffer(tensor.tensor_content, dtype="<f4")
        return np.asarray(tensor.float_val, dtype=np.float32)


class RestBackend(RankerBackend):
    """TF Serving over HTTP: the ``:predict`` JSON API, columnar ``inputs`` in, ``outputs`` out."""

    kind = "rest"

    def __init__(self, ranker: RankerRef, settings: PredictorSettings) -> None:
        super().__init__(ranker, settings)
        import httpx

        self._httpx = httpx
        self.target = settings.target.rstrip("/")
        self._client = http_client(self.target)
        self.url = f"/v1/models/{ranker.model_name}/versions/{ranker.version}:predict"

    def _call(self, inputs: dict[str, np.ndarray], timeout_s: float, signature: str) -> np.ndarray:
        body = {
            "signature_name": signature,
            "inputs": {
                name: [v.decode("utf-8") for v in values.tolist()]
                if values.dtype.kind == "S"
                else values.tolist()
                for name, values in inputs.items()
            },
        }
        httpx = self._httpx
        try:
            response = self._client.post(
                self.url,
                content=json.dumps(body, separators=(",", ":")),
                headers={"content-type": "application/json"},
                timeout=httpx.Timeout(timeout_s),
            )
        except httpx.TimeoutException:
            raise RankerTimeout(
                f"REST ranker {self.target}: no answer within {timeout_s * 1000:.0f} ms"
            ) from None
        except httpx.HTTPError as exc:
            raise RankerError(f"REST ranker {self.target}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise RankerError(
                f"REST ranker {self.target}{self.url}: HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        try:
            outputs = response.json()["outputs"]
        except (ValueError, KeyError, TypeError):
            raise RankerError(f"REST ranker {self.target}: no 'outputs' in the answer") from None
        if isinstance(outputs, dict):  # several outputs: keyed by name
            outputs = outputs.get(OUTPUT)
        try:
            return np.asarray(outputs, dtype=np.float32)
        except (TypeError, ValueError):
            raise RankerError(f"REST ranker {self.target}: outputs are not numbers") from None


BACKENDS: dict[str, Callable[[RankerRef, PredictorSettings], RankerBackend]] = {
    InProcessBackend.kind: InProcessBackend,
    GrpcBackend.kind: GrpcBackend,
    RestBackend.kind: RestBackend,
}


def create_backend(ranker: RankerRef, settings: PredictorSettings) -> RankerBackend:
    """The backend ``settings.backend`` names, for ``ranker``."""
    try:
        factory = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(
            f"unknown predictor backend {settings.backend!r} (known: {', '.join(BACKENDS)})"
        ) from None
    return factory(ranker, settings)
