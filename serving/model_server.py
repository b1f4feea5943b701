"""A stand-in for TF Serving, for tests and benchmarks on machines without its container.

DESIGN.md: "tests run a gRPC ``PredictionService`` built on ``tensorflow-serving-api``". This module
serves exported ranker versions with :class:`models.ranker.predictor.InProcessPredictor` behind
TF Serving's two public contracts, so the gRPC and REST backends are exercised over real loopback
sockets exactly as they would talk to ``tensorflow/serving``:

- gRPC: ``tensorflow.serving.PredictionService/Predict`` (a ``PredictionServiceServicer`` added
  with ``add_PredictionServiceServicer_to_server``): model name, optional version, signature name
  and ``TensorProto`` inputs in; ``TensorProto`` outputs out; unknown model → ``NOT_FOUND``, bad
  inputs → ``INVALID_ARGUMENT``.
- REST: ``POST /v1/models/<name>[/versions/<v>]:predict`` with ``{"signature_name", "inputs"}``
  (columnar) → ``{"outputs": [...]}``; errors → ``{"error": "..."}`` with a 4xx status.

``delay_s`` (settable while serving) makes every call sleep first — a slow ranker for deadline
tests. It is not a performance model of TF Serving (no server-side batching, Python in the loop).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from models.ranker.predictor import OUTPUT, InProcessPredictor, PredictorInputError


class ModelStore:
    """Loaded ranker versions by ``(name, version)``; the highest version answers when a request
    names none (TF Serving's default)."""

    def __init__(self, versions: Mapping[tuple[str, str], Path | InProcessPredictor]) -> None:
        self.models: dict[tuple[str, int], InProcessPredictor] = {
            (name, int(version)): p if isinstance(p, InProcessPredictor) else InProcessPredictor(p)
            for (name, version), p in versions.items()
        }
        self.delay_s = 0.0
        self.calls = 0

    def find(self, name: str, version: int | None) -> InProcessPredictor:
        if version is None:
            known = [v for (n, v) in self.models if n == name]
            if not known:
                raise KeyError(f"Servable not found for request: Latest({name})")
            version = max(known)
        try:
            return self.models[(name, version)]
        except KeyError:
            raise KeyError(f"Servable not found for request: Specific({name}, {version})") from None

    def predict(
        self, name: str, version: int | None, signature: str, inputs: dict[str, Any]
    ) -> np.ndarray:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.find(name, version).predict(inputs, signature or "serving_default")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``PredictionService/Predict`` over a :class:`ModelStore`."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        inputs = {name: tf.make_ndarray(t) for name, t in request.inputs.items()}
        try:
            scores = self.store.predict(spec.name, version, spec.signature_name, inputs)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except PredictorInputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(spec)
        response.outputs[OUTPUT].CopyFrom(tf.make_tensor_proto(np.asarray(scores, np.float32)))
        return response


def start_grpc_server(
    store: ModelStore, *, host: str = "127.0.0.1", port: int = 0, threads: int = 8
) -> tuple[grpc.Server, int]:
    """Serve ``store`` over gRPC on ``host:port`` (0: a free port); returns the server and port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 64 * 2**20),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(store), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


_PREDICT_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")


def _handler(store: ModelStore) -> type[BaseHTTPRequestHandler]:
    class PredictHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving
        disable_nagle_algorithm = True  # headers and body are separate writes

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            match = _PREDICT_PATH.match(self.path)
            if match is None:
                self._answer(404, {"error": f"Malformed request: POST {self.path}"})
                return
            try:
                body = json.loads(raw)
                inputs = body["inputs"]
                if not isinstance(inputs, dict):
                    raise TypeError("only the columnar 'inputs' format is supported")
            except (ValueError, KeyError, TypeError) as exc:
                self._answer(400, {"error": f"JSON Parse error: {exc}"})
                return
            version = int(match.group(2)) if match.group(2) else None
            arrays = {name: np.asarray(values) for name, values in inputs.items()}
            try:
                scores = store.predict(
                    match.group(1), version, body.get("signature_name", ""), arrays
                )
            except KeyError as exc:
                self._answer(404, {"error": str(exc.args[0])})
                return
            except PredictorInputError as exc:
                self._answer(400, {"error": str(exc)})
                return
            self._answer(200, {"outputs": np.asarray(scores, np.float64).round(9).tolist()})

    return PredictHandler


def start_rest_server(
    store: ModelStore, *, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``store`` with TF Serving's REST ``:predict`` contract in a background thread."""
    server = ThreadingHTTPServer((host, port), _handler(store))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="rest-model-server", daemon=True).start()
    return server, int(server.server_address[1])
