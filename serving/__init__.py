"""The online ad-ranking API (DESIGN.md, "serving"): request → entity lookup (mmap) → ANNOY top-K
(+ popular merge) → ranker on those candidates only → sort → response.

Modules, in the order a request meets them:

- ``server``: ``run(settings, workers)`` — uvicorn with N worker processes (``deepclick serve``);
- ``app``: ``create_app(settings)`` — routes, dependencies, body limit, metrics middleware;
- ``schemas``: request and response bodies (validation happens there);
- ``ranking``: the per-request flow with per-stage timings and degradation;
- ``features``: mmapped Arrow entity tables and the ranker-input assembler;
- ``backends``: ``RankerBackend`` — in-process SavedModel, TF Serving gRPC, TF Serving REST;
- ``release``: ``load_release`` — the unit that is validated and swapped (written by the
  lifecycle: ``lifecycle.release_writer``);
- ``reloader``: the watcher that follows ``releases/CURRENT`` and swaps releases atomically;
- ``metrics``: Prometheus metrics (per worker, or summed in multiprocess mode);
- ``model_server``: a TF Serving stand-in (gRPC + REST) for tests and benchmarks.

Imports stay light on purpose: nothing here imports pyspark, and TensorFlow is only loaded by the
in-process and gRPC backends (and the stand-in model server).
"""

import deepclick  # noqa: F401  (sets GRPC_ENABLE_FORK_SUPPORT before any module here loads gRPC)
