"""Benchmark: the fault probe of issue 12, replayed — what production does to the server and the
publisher, and what they answer.

On a fresh copy of a synthetic world (``bench.serving.build_world``: features, embeddings, ANNOY
index, DCN-v2 ranker, release), against a real ``deepclick serve``-equivalent server with one
worker on loopback, with bounded closed-loop load (a fixed number of keep-alive connections, each
bounded in time):

1. unloaded: one connection, nothing happening — the reference p99;
2. load at 1, 8 and 32 connections with a hot reload (CURRENT moves to another good release) in
   the middle;
3. load at 8 connections while CURRENT moves to each corrupt release: truncated index, truncated
   index with recomputed checksums, truncated embeddings, deleted SavedModel, and random bytes over
   the index's tree nodes with every checksum recomputed (the file that segfaulted ANNOY);
4. ranker faults with the gRPC backend against a stand-in TF Serving process: killed (SIGKILL)
   and hung (SIGSTOP) in the middle of the load;
5. ``kill -9`` at random moments of publishes (an index republished in place, a release), then a
   check that every ``CURRENT`` names a folder that verifies, and that the next publish leaves no
   staging or trash folder.

Each row: requests, errors (connection errors and 5xx other than overload 503s), degraded share,
p50/p99 of the answered requests, refusals (503 + Retry-After: overload or deadline), release
refusals (corrupt releases refused by the reloader), whether the server process is alive, and
whether the state on disk is valid. Results go to ``bench/results/<name>.json``.

    .venv/bin/python -m bench.faults [--ads 20000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_json
from bench.serving import (
    MODEL,
    MODEL_SERVER_SCRIPT,
    ROOT,
    SERVER_SCRIPT,
    build_world,
    free_port,
    process,
    request_bodies,
)

GOOD, SECOND = "20240103", "20240104"
CORRUPT = {
    "20240110": "truncated index",
    "20240111": "truncated index, checksums recomputed",
    "20240112": "truncated embeddings",
    "20240113": "deleted SavedModel",
    "20240114": "garbage ANNOY nodes, checksums recomputed",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ads", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--placements", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--num-ads", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=6.0, help="per scenario")
    parser.add_argument("--kills", type=int, default=10, help="kill -9 per publisher")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "dc-bench-faults"
    )
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument(
        "--backoff-s", type=float, default=0.0,
        help="also measure each load with clients that wait this long after a 503",
    )  # fmt: skip
    parser.add_argument("--load-only", action="store_true", help="skip faults and kills")
    parser.add_argument("--name", default="faults")
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the state


def _rewrite_checksums(folder: Path, manifest_name: str = "manifest.json") -> None:
    """What a buggy or hostile builder does: recompute a manifest over altered files."""
    from deepclick.publish import checksums

    manifest = json.loads((folder / manifest_name).read_text())
    manifest["checksums"] = checksums(folder, manifest_name)
    (folder / manifest_name).write_text(json.dumps(manifest, indent=2))


def _fix_release(root: Path, version: str, component: str) -> None:
    """Re-point release ``version``'s digest of ``component`` at its (altered) manifest."""
    from deepclick.publish import sha256_file

    release = root / "releases" / version
    spec = json.loads((release / "release.json").read_text())
    folder = root / spec[component]["folder"]
    name = "deepclick_manifest.json" if component == "ranker" else "manifest.json"
    spec[component]["manifest_sha256"] = sha256_file(folder / name)
    (release / "release.json").write_text(json.dumps(spec, indent=2))
    _rewrite_checksums(release)


def prepare_state(base: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """A fresh copy of the built world with a second good release and the corrupt ones."""
    from deepclick.publish import set_current
    from deepclick.settings import Settings
    from lifecycle.release_writer import publish_release

    root = work / "state"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    settings = Settings(root=root)
    parts = json.loads((root / "releases" / GOOD / "release.json").read_text())
    folders = {name: root / parts[name]["folder"] for name in ("feature_spec", "embeddings",
                                                               "index", "ranker")}  # fmt: skip

    def release_on(version: str, **swap: Path) -> None:
        chosen = {**folders, **swap}
        publish_release(
            settings, chosen["feature_spec"], chosen["embeddings"], chosen["index"],
            chosen["ranker"], version=version, update_current=False,
        )  # fmt: skip

    release_on(SECOND)
    copies: dict[str, Path] = {}
    for version, what in CORRUPT.items():
        kind = (
            "embeddings" if "embeddings" in what else "ranker" if "SavedModel" in what else "index"
        )
        copy = folders[kind].parent / version
        shutil.copytree(folders[kind], copy)
        copies[version] = copy
        release_on(version, **{kind: copy})
    rng = np.random.default_rng(0)
    for version, what in CORRUPT.items():
        copy = copies[version]
        if what.startswith("truncated index"):
            ann = copy / "ads.ann"
            with ann.open("r+b") as handle:
                handle.truncate(ann.stat().st_size // 2)
            if "recomputed" in what:
                _rewrite_checksums(copy)
                _fix_release(root, version, "index")
        elif what == "truncated embeddings":
            vectors = next(copy.glob("ads*vectors*.npy"))
            with vectors.open("r+b") as handle:
                handle.truncate(vectors.stat().st_size // 2)
        elif what == "deleted SavedModel":
            (copy / "saved_model.pb").unlink()
        else:  # the middle half of ads.ann overwritten, every digest recomputed
            ann = copy / "ads.ann"
            size = ann.stat().st_size
            with ann.open("r+b") as handle:
                handle.seek(size // 4)
                handle.write(rng.bytes(size // 2))
            _rewrite_checksums(copy)
            _fix_release(root, version, "index")
    set_current(root / "releases", GOOD)
    return root, folders


# --------------------------------------------------------------------------- the server


def child_env() -> dict[str, str]:
    """The environment of every child process: this checkout first on the path, TF quiet."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def server_env(root: Path, port: int, backend: str = "in_process", target: str = "") -> dict:
    from deepclick.settings import PredictorSettings, ServingSettings, Settings
    from serving.server import SETTINGS_ENV

    settings = Settings(
        root=root,
        predictor=PredictorSettings(
            backend=backend, target=target or "localhost:8500", signature="rank"
        ),
        serving=ServingSettings(port=port, reload_interval_s=0.5),
    )
    return {**child_env(), SETTINGS_ENV: settings.model_dump_json()}


def wait_ready(port: int, timeout_s: float = 300.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            if ready.status_code == 200:
                return ready.json()
        time.sleep(0.3)
    raise RuntimeError(f"server on port {port} not ready after {timeout_s:.0f} s")


def metric(port: int, name: str, labels: str) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def alive(server: subprocess.Popen, port: int) -> bool:
    import httpx

    if server.poll() is not None:
        return False
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def api_server(root: Path, backend: str = "in_process", target: str = "") -> Iterator[tuple]:
    port = free_port()
    argv = [sys.executable, "-c", SERVER_SCRIPT, "api", "1"]
    with process(argv, server_env(root, port, backend, target)) as server:
        wait_ready(port)
        yield server, port


# --------------------------------------------------------------------------- the load


async def _connection(
    port: int, bodies: Sequence[bytes], until: float, out: dict, backoff_s: float = 0.0
) -> None:
    """One keep-alive client: requests back to back until ``until``; reconnects after a closed
    or broken connection (a broken one counts as an error); waits ``backoff_s`` after a 503
    (a client honouring ``Retry-After``; 0: retry at once, the worst case)."""
    writer = None
    while time.perf_counter() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = random.choice(bodies)
            head = (
                b"POST /v1/rank HTTP/1.1\r\nhost: faults\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            started = time.perf_counter()
            writer.write(head + body)
            header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length, close = 0, False
            for line in header.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                close |= line == b"connection: close"
            payload = await reader.readexactly(length)
            seconds = time.perf_counter() - started
            status = int(header[9:12])
            out["statuses"][status] += 1
            if status == 200:
                out["latencies"].append(seconds)
                out["degraded"] += b'"degraded":true' in payload
            else:
                out["refusal_latencies"].append(seconds)
                if backoff_s:
                    await asyncio.sleep(min(backoff_s, max(0.0, until - time.perf_counter())))
            if close:
                writer.close()
                writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            out["errors"] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def load(
    port: int,
    bodies: Sequence[bytes],
    connections: int,
    seconds: float,
    middle: Any = None,
    end: Any = None,
    backoff_s: float = 0.0,
) -> dict[str, Any]:
    """``connections`` clients for ``seconds``; ``middle()`` runs (in a thread) at half time,
    ``end()`` after the load."""
    out: dict[str, Any] = {"statuses": Counter(), "latencies": [], "refusal_latencies": [],
                           "degraded": 0, "errors": 0}  # fmt: skip

    async def main() -> None:
        until = time.perf_counter() + seconds
        clients = [asyncio.create_task(_connection(port, bodies, until, out, backoff_s))
                   for _ in range(connections)]  # fmt: skip
        if middle is not None:
            await asyncio.sleep(seconds / 2)
            await asyncio.to_thread(middle)
        await asyncio.gather(*clients)

    asyncio.run(main())
    if end is not None:
        end()
    statuses: Counter = out["statuses"]
    answered = np.asarray(out["latencies"]) * 1000.0
    refusals = statuses.get(503, 0)
    errors = out["errors"] + sum(n for s, n in statuses.items() if s >= 500 and s != 503)
    ok = statuses.get(200, 0)
    return {
        "requests": sum(statuses.values()) + out["errors"],
        "errors": errors,
        "degraded_share": out["degraded"] / ok if ok else 0.0,
        "p50_ms": float(np.percentile(answered, 50)) if ok else None,
        "p99_ms": float(np.percentile(answered, 99)) if ok else None,
        "refusals": refusals,
        "refusal_p99_ms": float(np.percentile(np.asarray(out["refusal_latencies"]) * 1000, 99))
        if refusals
        else None,
        "other_statuses": {s: n for s, n in statuses.items() if s not in (200, 503)},
    }


# --------------------------------------------------------------------------- kill -9 publishes

PUBLISHER_SCRIPT = """
import json, sys
from pathlib import Path
from deepclick.settings import Settings
root, kind = Path(sys.argv[1]), sys.argv[2]
parts = json.loads((root / "releases" / "20240103" / "release.json").read_text())
f = {n: root / parts[n]["folder"] for n in ("feature_spec", "embeddings", "index", "ranker")}
while True:
    if kind == "index":
        from candidates.index import build_index
        build_index(f["embeddings"], root / "artifacts" / "index", n_trees=10, recall_floor=0.0,
                    version="20240120")
    else:
        from lifecycle.release_writer import publish_release
        publish_release(Settings(root=root), f["feature_spec"], f["embeddings"], f["index"],
                        f["ranker"], version="20240121", update_current=False)
"""


def state_valid(root: Path) -> tuple[bool, list[str]]:
    """Every CURRENT names a folder that verifies against its manifest; leftovers listed."""
    from deepclick.publish import CURRENT, MANIFEST, current_version, verify

    ok = True
    for pointer in root.rglob(CURRENT):
        version = current_version(pointer.parent)
        folder = pointer.parent / str(version)
        manifest = MANIFEST if (folder / MANIFEST).is_file() else "deepclick_manifest.json"
        try:
            verify(folder, manifest)
        except Exception:  # any failure: the pointer names something unusable
            ok = False
    leftovers = [str(p.relative_to(root)) for p in root.rglob(".staging-*")]
    leftovers += [str(p.relative_to(root)) for p in root.rglob(".trash-*")]
    return ok, leftovers


def kill_publishers(root: Path, kills: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    rng = random.Random(seed)
    for kind, parent in (("index", "artifacts/index"), ("release", "releases")):
        valid_after = 0
        for _ in range(kills):
            with process([sys.executable, "-c", PUBLISHER_SCRIPT, str(root), kind],
                         child_env()) as child:  # fmt: skip
                time.sleep(rng.uniform(1.0, 6.0))
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
            valid_after += state_valid(root)[0]
        left_before = [p for p in state_valid(root)[1] if p.startswith(parent)]
        # the next publish of that folder cleans what the kills left
        subprocess.run([sys.executable, "-c", PUBLISHER_SCRIPT.replace("while True:", "if 1:"),
                        str(root), kind], env=child_env(), cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        left_after = [p for p in state_valid(root)[1] if p.startswith(parent)]
        rows.append({
            "scenario": f"kill -9 during {kind} publishes",
            "connections": 0,
            "state_valid": f"{valid_after}/{kills}",
            "leftovers": f"{len(left_before)} → {len(left_after)} after next publish",
        })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    from deepclick.publish import set_current

    args = parse_args(argv)
    world = argparse.Namespace(ads=args.ads, users=args.users, placements=args.placements,
                               rebuild=args.rebuild, seed=args.seed)  # fmt: skip
    base = build_world(args.work, world)
    root, _ = prepare_state(base, args.work)
    releases = root / "releases"
    bodies = request_bodies(root, args)
    rows: list[dict[str, Any]] = []

    def row(scenario: str, connections: int, result: dict, server: Any, port: int, **extra: Any):
        rows.append({"scenario": scenario, "connections": connections, **result,
                     "alive": alive(server, port), **extra})  # fmt: skip
        print_table("so far", rows[-1:])
        write_json(f"{args.name}-partial", {"args": vars(args), "rows": rows})

    with api_server(root) as (server, port):
        load(port, bodies, 4, 3.0)  # warm up
        row("unloaded", 1, load(port, bodies, 1, args.seconds), server, port)
        target = [SECOND]
        for connections in args.concurrency:

            def reload() -> None:
                set_current(releases, target[0])
                target[0] = GOOD if target[0] == SECOND else SECOND

            result = load(port, bodies, connections, args.seconds, middle=reload)
            row("hot reload", connections, result, server, port)
            if args.backoff_s:
                result = load(port, bodies, connections, args.seconds, middle=reload,
                              backoff_s=args.backoff_s)  # fmt: skip
                row(f"hot reload, clients wait {args.backoff_s:g} s after a 503", connections,
                    result, server, port)  # fmt: skip
        for version, what in CORRUPT.items() if not args.load_only else ():
            outcome = 'outcome="refused"'
            before = metric(port, "deepclick_release_reloads_total", outcome)
            result = load(port, bodies, 8, args.seconds,
                          middle=lambda v=version: set_current(releases, v))  # fmt: skip
            decided = time.monotonic() + 60  # let the reloader decide (a child searches it)
            refused = 0.0
            while not refused and time.monotonic() < decided:
                time.sleep(0.5)
                refused = metric(port, "deepclick_release_reloads_total", outcome) - before
            row(f"corrupt: {what}", 8, result, server, port, release_refusals=int(refused))
            set_current(releases, GOOD)
            time.sleep(1.5)

    # ranker faults: gRPC backend against a stand-in TF Serving in its own process
    ranker = next((root / "model_repository" / MODEL).glob(GOOD))
    faults = (("ranker killed", signal.SIGKILL, None),
              ("ranker hung", signal.SIGSTOP, signal.SIGCONT))  # fmt: skip
    for fault, sig, resume in faults if not args.load_only else ():
        grpc_port = free_port()
        script = [sys.executable, "-c", MODEL_SERVER_SCRIPT, MODEL, str(ranker), str(grpc_port)]
        with process(script, child_env()) as model_server:
            assert model_server.stdout is not None
            model_server.stdout.readline()
            with api_server(root, "grpc", f"127.0.0.1:{grpc_port}") as (server, port):
                load(port, bodies, 4, 2.0)

                def hit(pid: int = model_server.pid, s: signal.Signals = sig) -> None:
                    os.killpg(pid, s)

                def heal(pid: int = model_server.pid, s: signal.Signals | None = resume) -> None:
                    if s is not None:
                        os.killpg(pid, s)

                result = load(port, bodies, 8, args.seconds, middle=hit, end=heal)
                ready = wait_ready(port, 10)
                row(fault, 8, result, server, port, readyz=ready["status"])

    if not args.load_only:
        rows += kill_publishers(root, args.kills, args.seed)
    unloaded = rows[0]["p99_ms"]
    top = max(args.concurrency)
    loaded = next(r for r in rows if r["scenario"] == "hot reload" and r["connections"] == top)
    summary = {
        "process_deaths": sum(1 for r in rows if r.get("alive") is False),
        "non_degraded_errors": sum(r.get("errors", 0) for r in rows),
        f"p99_at_{top}_over_unloaded": loaded["p99_ms"] / unloaded,
        "release_refusals": {
            r["scenario"]: r.get("release_refusals") for r in rows if "release_refusals" in r
        },
    }
    backoff = [r for r in rows if "clients wait" in r["scenario"] and r["connections"] == top]
    if backoff:
        summary[f"p99_at_{top}_over_unloaded_with_backoff"] = backoff[0]["p99_ms"] / unloaded
    shown = [{k: v for k, v in r.items() if k not in ("other_statuses", "refusal_p99_ms")}
             for r in rows]  # fmt: skip
    print_table(f"faults ({args.ads:,} ads, 1 worker, {args.seconds:g} s per scenario)", shown)
    print(json.dumps(summary, indent=2))
    path = write_json(args.name, {"args": vars(args), "rows": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
