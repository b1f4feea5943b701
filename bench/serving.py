"""Benchmark: the ranking API over loopback — latency, throughput, ratios and shared memory.

DESIGN.md targets (2 cores): ``/v1/rank`` with 500 candidates from 100k ads, in-process ranker:
p99 ≤ 15 ms and ≥ 20× faster than scoring every ad; with 2 workers ≥ 30% of a bare FastAPI
endpoint's requests/s; 4 workers hold the index at ≤ 1.3× the memory of one.

Everything is measured in one run on the same machine and the same requests:

1. a synthetic world: tests/feature_folder.py's planted features folder scaled to ``--ads`` ads,
   clustered embeddings for its ids (candidates.synthetic-style; no two-tower training), an ANNOY
   index (``search_k`` tuned to recall@100 ≥ 0.9), a DCN-v2 ranker with the default sizes trained
   for one epoch on the two-tower scores, and a release of them all;
2. signatures: ``rank`` vs ``serving_default`` per backend at ``--candidates`` candidates, called
   directly (no HTTP), to choose each backend's signature;
3. ``deepclick serve``-equivalent servers (``serving.server.run``) with 1, 2 and 4 uvicorn workers,
   in-process and gRPC backends (gRPC against serving.model_server, a Python stand-in for TF
   Serving in its own process — not TF Serving's performance), each under a closed-loop load
   generator (a small asyncio HTTP/1.1 keep-alive client, bounded in requests and seconds) at
   several concurrencies;
4. the same requests against full ranking (one route scoring every ad with the same ranker) and
   against a bare FastAPI endpoint (same request model, constant answer), as ratios;
5. per-worker PSS / RSS / shared memory and the PSS of the index, embeddings and entity-table
   mappings with 1 vs 4 workers (/proc/<pid>/smaps_rollup and smaps).

The load generator shares the two cores with the servers, so absolute numbers are pessimistic;
ratios compare like with like.

    .venv/bin/python -m bench.serving [--ads 100000] [--candidates 500] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import latency_ms, memory_kb, print_table, write_json
from serving.app import MetricsDep, ReleaseDep
from serving.schemas import RankRequest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ranker"
DIM = 32
FULL_RANK_PATH = "/bench/full_rank"
BARE_PATH = "/v1/rank"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ads", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--placements", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--num-ads", type=int, default=10, help="ads returned per request")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--backends", nargs="+", default=["in_process", "grpc"])
    parser.add_argument("--requests", type=int, default=1500, help="per measurement, at most")
    parser.add_argument("--seconds", type=float, default=12.0, help="per measurement, at most")
    parser.add_argument("--full-requests", type=int, default=12)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "dc-bench-serving"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the world")
    parser.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    parser.add_argument("--name", default="serving", help="results file name")
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- 1. the world


def build_world(work: Path, args: argparse.Namespace) -> Path:
    """Publish a release of ``args.ads`` ads under ``work/var``; reuse a previous build of the
    same size. Returns the state root."""
    root = work / "var"
    marker = root / f"built-{args.ads}-{args.users}-{args.placements}.json"
    if marker.is_file() and not args.rebuild:
        return root
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from feature_folder import write_feature_folder

    from candidates.index import build_index
    from candidates.store import publish_embeddings, read_embeddings
    from deepclick.settings import RankerSettings, Settings
    from lifecycle.release_writer import publish_release
    from models.ranker.export import export_ranker
    from models.ranker.similarity import EmbeddingSimilarity
    from models.ranker.train import train_ranker

    started = time.perf_counter()
    settings = Settings(root=root)
    folder = write_feature_folder(
        root / "warehouse" / "features" / "20240103",
        users=args.users, placements=args.placements, ads=args.ads, new_ads=0,
        impressions_per_day=30_000, train_days=2, groups=16, seed=args.seed,
    )  # fmt: skip
    version = folder.spec.version
    rng = np.random.default_rng(args.seed)
    truth = folder.truth
    centres = rng.standard_normal((truth.groups, DIM)).astype(np.float32) / np.sqrt(DIM)

    def around(groups: np.ndarray, spread: float) -> np.ndarray:
        noise = rng.standard_normal((len(groups), DIM)).astype(np.float32) / np.sqrt(DIM)
        return centres[groups] + np.float32(spread) * noise

    users = folder.table("entities/users")["user_id"].astype(str).to_numpy()
    ads = folder.table("entities/ads")["ad_id"].astype(str).to_numpy()
    places = folder.table("entities/placements")["placement_id"].astype(str).to_numpy()
    ad_vectors = around(np.array([truth.ad_category[a] for a in ads]), 0.6)
    ad_vectors *= rng.lognormal(0.0, 0.3, (len(ads), 1)).astype(np.float32)
    user_vectors = around(np.array([truth.user_group[u] for u in users]), 0.6)
    place_vectors = (0.3 * rng.standard_normal((len(places), DIM)) / np.sqrt(DIM)).astype(
        np.float32
    )
    tables = {
        "users": (users, user_vectors),
        "ads": (ads, ad_vectors),
        "placements": (places, place_vectors),
    }
    fallbacks = {"user": user_vectors.mean(0), "placement": place_vectors.mean(0)}
    embeddings = publish_embeddings(root / "artifacts" / "embeddings", version, tables, fallbacks)
    popularity = folder.table("popularity")[["placement_id", "ad_id", "clicks"]]
    index = build_index(
        embeddings, root / "artifacts" / "index",
        popularity=list(popularity.itertuples(index=False, name=None)),
        n_trees=50, recall_floor=0.9, tune_search_k=True, n_jobs=2,
    )  # fmt: skip
    similarity = EmbeddingSimilarity(read_embeddings(embeddings))
    ranker_settings = RankerSettings(epochs=1, baseline=False)
    trained = train_ranker(folder.spec, ranker_settings, similarity=similarity, progress=False)
    ranker = export_ranker(trained, settings.model_repository, MODEL, version)
    publish_release(settings, folder.path, embeddings, index, ranker)
    marker.write_text(
        json.dumps({"seconds": time.perf_counter() - started, "metrics": trained.metrics})
    )
    return root


# --------------------------------------------------------------------------- bench apps


def _settings_from_env() -> Any:
    from deepclick.settings import Settings
    from serving.server import SETTINGS_ENV

    return Settings(**json.loads(os.environ[SETTINGS_ENV]))


def full_app() -> Any:
    """The API plus ``POST /bench/full_rank``: the same request scored against every ad of the
    catalogue with the same ranker (what retrieval saves)."""
    from serving.app import create_app

    app = create_app(_settings_from_env())

    def full_rank(body: RankRequest, release: ReleaseDep, metrics: MetricsDep) -> dict[str, Any]:
        started = time.perf_counter()
        ids = [bytes(a).decode() for a in release.candidates.index.ad_ids]
        lookup = release.features.lookup(body.user_id, body.placement_id)
        gathered = release.features.gather(
            body.user_id, body.placement_id, ids, lookup=lookup, request_time=body.request_time
        )
        pctr = release.backend.predict(gathered.common, gathered.candidates, timeout_s=60.0)
        top = np.argsort(-pctr)[: body.num_ads]
        return {
            "ads": [{"ad_id": ids[i], "pctr": float(pctr[i])} for i in top],
            "candidates_considered": len(ids),
            "ms": (time.perf_counter() - started) * 1000,
        }

    app.add_api_route(FULL_RANK_PATH, full_rank, methods=["POST"])
    return app


def bare_app() -> Any:
    """A bare FastAPI endpoint: the same path and request model, a constant small answer."""
    from fastapi import FastAPI

    app = FastAPI()
    answer = {"ads": [{"ad_id": f"a{i}", "pctr": 0.01, "score": 0.01} for i in range(10)]}

    async def rank(body: RankRequest) -> dict[str, Any]:
        return answer

    app.add_api_route(BARE_PATH, rank, methods=["POST"])
    return app


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SERVER_SCRIPT = """
import json, os, sys, uvicorn
from deepclick.settings import Settings
from serving.server import run, SETTINGS_ENV
kind, workers = sys.argv[1], int(sys.argv[2])
settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
if kind == "api":
    run(settings, workers, log_level="warning")
else:
    uvicorn.run(f"bench.serving:{kind}_app", factory=True, host=settings.serving.host,
                port=settings.serving.port, workers=workers, log_level="warning",
                access_log=False)
"""

MODEL_SERVER_SCRIPT = """
import sys, time
from pathlib import Path
from serving.model_server import ModelStore, start_grpc_server
store = ModelStore({(sys.argv[1], Path(sys.argv[2]).name): Path(sys.argv[2])})
server, port = start_grpc_server(store, port=int(sys.argv[3]), threads=8)
print("ready", flush=True)
server.wait_for_termination()
"""


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child process in its own session, always terminated (with its workers)."""
    child = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True, text=True,
    )  # fmt: skip
    try:
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under ``parent`` (spawned children; not multiprocessing's
    resource tracker), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def server_env(root: Path, port: int, backend: str, target: str, signature: str) -> dict[str, str]:
    from deepclick.settings import PredictorSettings, ServingSettings, Settings
    from serving.server import SETTINGS_ENV

    settings = Settings(
        root=root,
        predictor=PredictorSettings(backend=backend, target=target, signature=signature),
        serving=ServingSettings(port=port, reload_interval_s=3600.0),
    )
    env = dict(os.environ)
    env[SETTINGS_ENV] = settings.model_dump_json()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def wait_workers_ready(port: int, workers: int, *, needs_release: bool, timeout_s: float) -> None:
    """Until every worker answers: with a release, /metrics (multiprocess when workers > 1)
    shows one loaded-release series per worker; without, a fresh connection gets an answer."""
    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if not needs_release:
                httpx.post(f"{url}{BARE_PATH}", json={"user_id": "u", "placement_id": "p"})
                time.sleep(1.0)
                return
            text = httpx.get(f"{url}/metrics", timeout=5).text
            live = [
                line
                for line in text.splitlines()
                if line.startswith("deepclick_release_loaded{") and line.endswith(" 1.0")
            ]
            if len(live) >= workers and httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not ready after {timeout_s:.0f} s")


# --------------------------------------------------------------------------- load generator


async def _one_connection(
    port: int,
    path: bytes,
    bodies: Sequence[bytes],
    budget: dict[str, Any],
    latencies: list[float],
    statuses: Counter,
    degraded: Counter,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while budget["left"] > 0 and time.perf_counter() < budget["until"]:
            budget["left"] -= 1
            body = bodies[budget["next"] % len(bodies)]
            budget["next"] += 1
            head = (
                b"POST " + path + b" HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            started = time.perf_counter()
            writer.write(head + body)
            header = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in header.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[int(header[9:12])] += 1
            if b'"degraded":true' in payload:
                degraded["degraded"] += 1
    finally:
        writer.close()


def load(
    port: int, path: str, bodies: Sequence[bytes], concurrency: int, requests: int, seconds: float
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` keep-alive connections send requests back to back until
    ``requests`` were sent or ``seconds`` passed; latency percentiles and requests/s."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    degraded: Counter = Counter()

    async def main() -> float:
        budget = {"left": requests, "next": random.randrange(len(bodies)), "until": 0.0}
        started = time.perf_counter()
        budget["until"] = started + seconds
        await asyncio.gather(
            *(
                _one_connection(port, path.encode(), bodies, budget, latencies, statuses, degraded)
                for _ in range(concurrency)
            )
        )
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "non_200": sum(n for s, n in statuses.items() if s != 200),
        "degraded": degraded["degraded"],
    }


def request_bodies(root: Path, args: argparse.Namespace, n: int = 2000) -> list[bytes]:
    """Requests for known users on known placements (plus a few unknown users: cold start)."""
    import pandas as pd

    features = root / "warehouse" / "features" / "20240103" / "entities"
    users = pd.read_parquet(features / "users", columns=["user_id"])["user_id"].tolist()
    places = pd.read_parquet(features / "placements", columns=["placement_id"])
    placements = places["placement_id"].tolist()
    rng = random.Random(args.seed)
    bodies = []
    for i in range(n):
        user = rng.choice(users) if i % 50 else f"new-user-{i}"
        body = {
            "user_id": user,
            "placement_id": rng.choice(placements),
            "num_ads": args.num_ads,
            "num_candidates": args.candidates,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


# --------------------------------------------------------------------------- measurements


def signature_timings(root: Path, args: argparse.Namespace, grpc_port: int) -> list[dict]:
    """``rank`` vs ``serving_default`` per backend, backend calls only (no HTTP), on real
    ``--candidates``-candidate requests; REST and gRPC against serving.model_server."""
    from deepclick.settings import PredictorSettings
    from serving.backends import create_backend
    from serving.model_server import ModelStore, start_rest_server
    from serving.release import current_release_folder, load_release

    release = load_release(current_release_folder(root))
    users = [bytes(u).decode() for u in release.features.tables["user"].ids[::997][:40]]
    requests = []
    for i, user in enumerate(users):
        placement = bytes(release.features.tables["context"].ids[i % 10]).decode()
        found = release.candidates.candidates(user, placement, args.candidates)
        lookup = release.features.lookup(user, placement)
        requests.append(release.features.gather(user, placement, found.ad_ids, lookup=lookup))
    store = ModelStore({(MODEL, release.backend.ranker.version): release.backend.ranker.folder})
    rest, rest_port = start_rest_server(store)
    targets = {
        "in_process": "",
        "grpc": f"127.0.0.1:{grpc_port}",
        "rest": f"http://127.0.0.1:{rest_port}",
    }
    rows = []
    signatures = ("rank", "serving_default")
    try:
        for backend_kind, target in targets.items():
            backends = {
                signature: create_backend(
                    release.backend.ranker,
                    PredictorSettings(
                        backend=backend_kind,
                        target=target or "x",
                        signature=signature,
                        timeout_ms=10_000,
                    ),
                )
                for signature in signatures
            }
            seconds: dict[str, list[float]] = {s: [] for s in signatures}
            for repeat in range(4):  # A/B interleaved call by call: load noise hits both alike
                for i, g in enumerate(requests):
                    order = signatures if (i + repeat) % 2 else signatures[::-1]
                    for signature in order:
                        started = time.perf_counter()
                        backends[signature].predict(g.common, g.candidates)
                        if repeat:  # the first pass warms up
                            seconds[signature].append(time.perf_counter() - started)
            for signature, backend in backends.items():
                backend.close()
                rows.append(
                    {
                        "backend": backend_kind,
                        "signature": signature,
                        "candidates": args.candidates,
                        "calls": len(seconds[signature]),
                        **latency_ms(seconds[signature]),
                    }
                )
    finally:
        rest.shutdown()
    return rows


def stage_breakdown(port: int, bodies: Sequence[bytes], n: int = 300) -> dict[str, Any]:
    """Sequential requests: p50 of each stage the API reports (``timings_ms``) and of the
    client-side latency; their difference is HTTP + framework + thread hand-offs."""
    import httpx

    stages: dict[str, list[float]] = {}
    client_ms = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        for body in bodies[:n]:
            started = time.perf_counter()
            answer = http.post(
                "/v1/rank", content=body, headers={"content-type": "application/json"}
            ).json()
            client_ms.append((time.perf_counter() - started) * 1000)
            for stage, ms in answer["timings_ms"].items():
                stages.setdefault(stage, []).append(ms)
    out: dict[str, Any] = {f"{s}_p50_ms": float(np.median(v)) for s, v in stages.items()}
    out["client_p50_ms"] = float(np.median(client_ms))
    out["http_and_framework_p50_ms"] = float(
        np.median(np.asarray(client_ms) - np.asarray(stages["total"]))
    )
    return out


def memory_of(pids: Sequence[int], files: dict[str, Path]) -> dict[str, Any]:
    """Per-worker totals (kB) and, per mapped file, the PSS summed over the workers."""
    per_worker = [memory_kb(pid) for pid in pids]
    out: dict[str, Any] = {
        "workers": len(pids),
        "pss_mb_per_worker": round(np.mean([m.get("Pss", 0) for m in per_worker]) / 1024, 1),
        "rss_mb_per_worker": round(np.mean([m.get("Rss", 0) for m in per_worker]) / 1024, 1),
        "shared_mb_per_worker": round(
            np.mean([m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) for m in per_worker])
            / 1024,
            1,
        ),
        "pss_mb_total": round(sum(m.get("Pss", 0) for m in per_worker) / 1024, 1),
    }
    for name, path in files.items():
        pss = sum(memory_kb(pid, path).get("Pss", 0) for pid in pids)
        rss = max(memory_kb(pid, path).get("Rss", 0) for pid in pids)
        out[f"{name}_pss_mb_sum"] = round(pss / 1024, 2)
        out[f"{name}_rss_mb_max"] = round(rss / 1024, 2)
    return out


def mapped_files(root: Path) -> dict[str, Path]:
    from serving.release import current_release_folder

    release = current_release_folder(root)
    manifest = json.loads((release / "release.json").read_text())
    index = root / manifest["index"]["folder"]
    embeddings = root / manifest["embeddings"]["folder"]
    return {
        "ads.ann": (index / "ads.ann").resolve(),
        "ads_vectors": (embeddings / "ads_vectors.npy").resolve(),
        "ads.arrow": (release / "entities" / "ads.arrow").resolve(),
    }


def run_server_and_load(
    kind: str,
    root: Path,
    args: argparse.Namespace,
    bodies: list[bytes],
    *,
    workers: int,
    backend: str,
    target: str,
    signature: str,
    concurrencies: Sequence[int],
    path: str,
    requests: int,
    memory: bool = False,
    breakdown: bool = False,
) -> tuple[list[dict], dict | None]:
    port = free_port()
    env = server_env(root, port, backend, target, signature)
    argv = [sys.executable, "-c", SERVER_SCRIPT, kind, str(workers)]
    rows = []
    mem = None
    with process(argv, env) as child:
        started = time.perf_counter()
        wait_workers_ready(port, workers, needs_release=kind != "bare", timeout_s=600)
        startup = time.perf_counter() - started
        load(port, path, bodies, max(concurrencies), min(200, requests), 20.0)  # warm up
        for concurrency in concurrencies:
            result = load(port, path, bodies, concurrency, requests, args.seconds)
            rows.append(
                {
                    "name": kind if kind != "api" else f"rank/{backend}",
                    "workers": workers,
                    "concurrency": concurrency,
                    **result,
                    "startup_s": round(startup, 1),
                    "load_avg": round(os.getloadavg()[0], 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if memory:
            pids = [child.pid] if workers == 1 else worker_pids(child.pid)
            mem = memory_of(pids, mapped_files(root))
        if breakdown:
            rows[0]["stages"] = stage_breakdown(port, bodies)
            print(json.dumps(rows[0]["stages"]), flush=True)
    return rows, mem


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.workers, args.concurrency, args.requests = [1, 2], [1, 8], 400
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = build_world(args.work, args)
    print(f"world ready in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
    bodies = request_bodies(root, args)

    grpc_port = free_port()
    release = json.loads((root / "releases" / "20240103" / "release.json").read_text())
    ranker_folder = root / release["ranker"]["folder"]
    model_server = [sys.executable, "-c", MODEL_SERVER_SCRIPT, MODEL, str(ranker_folder)]
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "load_average_before": os.getloadavg(),
    }
    with process([*model_server, str(grpc_port)]) as stand_in:
        assert stand_in.stdout is not None and stand_in.stdout.readline().strip() == "ready"
        signatures = signature_timings(root, args, grpc_port)
        print_table(
            f"backend call, {args.candidates} candidates: rank vs serving_default", signatures
        )
        results["signatures"] = signatures
        best = {}
        for backend in ("in_process", "grpc", "rest"):
            timed = [r for r in signatures if r["backend"] == backend]
            best[backend] = min(timed, key=lambda r: r["p50_ms"])["signature"]
        results["chosen_signature"] = best

        rows: list[dict] = []
        memory: list[dict] = []
        for backend in args.backends:
            for workers in args.workers:
                found, mem = run_server_and_load(
                    "api", root, args, bodies, workers=workers, backend=backend,
                    target=f"127.0.0.1:{grpc_port}" if backend == "grpc" else "x",
                    signature=best[backend], concurrencies=args.concurrency, path="/v1/rank",
                    requests=args.requests,
                    memory=backend == "in_process" and workers in (1, 4),
                    breakdown=workers == 1,
                )  # fmt: skip
                rows += found
                if mem is not None:
                    memory.append(mem)
        for workers in args.workers:
            found, _ = run_server_and_load(
                "bare", root, args, bodies, workers=workers, backend="in_process", target="x",
                signature="rank", concurrencies=args.concurrency, path=BARE_PATH,
                requests=args.requests * 3,
            )  # fmt: skip
            rows += found
        full, _ = run_server_and_load(
            "full", root, args, bodies, workers=1, backend="in_process", target="x",
            signature=best["in_process"], concurrencies=[1], path=FULL_RANK_PATH,
            requests=args.full_requests,
        )  # fmt: skip
        rows += full

    stages = [{"name": r["name"], **r.pop("stages")} for r in rows if "stages" in r]
    print_table(
        f"/v1/rank over loopback: {args.candidates} candidates of {args.ads:,} ads "
        f"(load generator on the same 2 cores)",
        rows,
    )
    results["runs"] = rows
    if stages:
        print_table("where the time goes: p50 per stage, 1 worker, sequential requests", stages)
        results["stages"] = stages
    if memory:
        print_table("memory per worker (MB) and mapped files' PSS summed over workers", memory)
        results["memory"] = memory
    results["summary"] = summarise(rows, memory)
    results["load_average_after"] = os.getloadavg()
    print_table("targets", results["summary"])
    path = write_json(args.name, results)
    print(f"wrote {path}")


def summarise(rows: list[dict], memory: list[dict]) -> list[dict]:
    def pick(name: str, workers: int, concurrency: int | None = None) -> list[dict]:
        return [
            r
            for r in rows
            if r["name"] == name
            and r["workers"] == workers
            and (concurrency is None or r["concurrency"] == concurrency)
        ]

    out = []
    single = pick("rank/in_process", 1, 1)
    if single:
        out.append(
            {
                "target": "p99 ≤ 15 ms, in-process, 1 worker, concurrency 1",
                "value": f"{single[0]['p99_ms']:.1f} ms (p50 {single[0]['p50_ms']:.1f})",
                "met": single[0]["p99_ms"] <= 15.0,
            }
        )
    full = pick("full", 1, 1)
    if single and full:
        ratio = full[0]["p50_ms"] / single[0]["p50_ms"]
        out.append(
            {
                "target": "≥ 20× faster than scoring every ad (p50, concurrency 1)",
                "value": f"{ratio:.0f}× ({full[0]['p50_ms']:.0f} vs {single[0]['p50_ms']:.1f} ms)",
                "met": ratio >= 20,
            }
        )
    # Throughput counts only runs that were not shedding load (≤ 1% degraded answers): a
    # degraded answer skips the ranker, so it is cheaper and would flatter the number.
    ranked = [r for r in pick("rank/in_process", 2) if r["degraded"] <= 0.01 * r["requests"]]
    bare = pick("bare", 2)
    if ranked and bare:
        best_rank = max(r["rps"] for r in ranked)
        best_bare = max(r["rps"] for r in bare)
        out.append(
            {
                "target": "≥ 30% of bare FastAPI requests/s, 2 workers (best concurrency, "
                "≤ 1% degraded)",
                "value": f"{best_rank / best_bare:.0%} ({best_rank:.0f} vs {best_bare:.0f} req/s)",
                "met": best_rank / best_bare >= 0.3,
            }
        )
    by_workers = {m["workers"]: m for m in memory}
    if 1 in by_workers and 4 in by_workers:
        one, four = by_workers[1]["ads.ann_pss_mb_sum"], by_workers[4]["ads.ann_pss_mb_sum"]
        out.append(
            {
                "target": "4 workers hold the index at ≤ 1.3× the memory of one (PSS sum)",
                "value": f"{four / one:.2f}× ({four:.1f} vs {one:.1f} MB)" if one else "n/a",
                "met": bool(one) and four / one <= 1.3,
            }
        )
    return out


if __name__ == "__main__":
    main()
