"""Benchmark: candidate retrieval on vectors shaped like two-tower outputs.

DESIGN.md targets: with 1M ads × 64 dims, ANNOY recall@100 against exact search ≥ 0.95 with queries
faster than exact numpy search; 4 worker processes hold the index at ≤ 1.3× the memory of one.
For each size, on the same vectors and queries in one run: exact numpy search (matrix-vector
product + argpartition), ANNOY with both metrics (``dot``, and ``angular`` over MIPS-augmented
vectors), and hnswlib (inner-product space) as an outside reference. Each approximate method is
swept over its search effort and reported at the smallest effort that reaches the recall target.

    .venv/bin/python -m bench.candidates [--sizes 10000 100000 1000000] [--dim 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import latency_ms, memory_kb, print_table, write_json
from candidates.index import DEFAULT_METRIC, Metric, build_index, open_index
from candidates.store import publish_embeddings
from candidates.synthetic import two_tower_like
from deepclick.publish import read_manifest
from deepclick.topk import ann_recall, exact_top_k, top_rows

TARGET_RECALL = 0.95
RECALL_K = 100
LARGE_K = 500
Search = Callable[[np.ndarray, int], Sequence[int]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement")
    parser.add_argument("--n-trees", type=int, default=50)
    parser.add_argument("--n-jobs", type=int, default=-1, help="ANNOY build threads")
    parser.add_argument(
        "--search-k-factors",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32],
        help="ANNOY search_k as multiples of n_trees * 100",
    )
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=100)
    parser.add_argument("--hnsw-ef", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--methods", nargs="+", default=["exact", "annoy-dot", "annoy-angular", "hnsw"]
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--crossing",
        action="store_true",
        help="only build each size's index the way the pipeline does (IndexSettings defaults) "
        "and report the exact-vs-ANN choice its manifest records",
    )
    parser.add_argument("--name", default="candidates", help="results file name")
    return parser.parse_args(argv)


def timed(search: Search, queries: np.ndarray, k: int) -> tuple[list[list[int]], list[float]]:
    """Answers and per-query seconds, after a short warm-up (page faults, caches)."""
    for query in queries[:5]:
        search(query, k)
    answers, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        answers.append(list(search(query, k)))
        seconds.append(time.perf_counter() - started)
    return answers, seconds


def measure(search: Search, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Recall@100 and latency at K=100 and K=500 of one configured search."""
    answers, small = timed(search, queries, RECALL_K)
    _, large = timed(search, queries, LARGE_K)
    at_small, at_large = latency_ms(small), latency_ms(large)
    return {
        "recall@100": ann_recall(answers, truth),
        "k100_p50_ms": at_small["p50_ms"],
        "k100_p99_ms": at_small["p99_ms"],
        "k500_p50_ms": at_large["p50_ms"],
        "k500_p99_ms": at_large["p99_ms"],
    }


def sweep(
    label: str,
    efforts: Sequence[int],
    searcher: Callable[[int], Search],
    queries: np.ndarray,
    truth: np.ndarray,
) -> tuple[int, list[dict[str, Any]]]:
    """Recall@100 and p50 per effort; returns the smallest effort reaching the target (else the
    largest) and the sweep rows."""
    rows = []
    for effort in efforts:
        answers, seconds = timed(searcher(effort), queries, RECALL_K)
        rows.append(
            {
                "method": label,
                "effort": effort,
                "recall@100": ann_recall(answers, truth),
                "k100_p50_ms": latency_ms(seconds)["p50_ms"],
            }
        )
    reached = [row["effort"] for row in rows if row["recall@100"] >= TARGET_RECALL]
    return (reached[0] if reached else efforts[-1]), rows


def bench_exact(ads: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    def search(query: np.ndarray, k: int) -> np.ndarray:
        return top_rows(ads @ query, k)

    return {
        "method": "exact numpy",
        "params": "matvec + argpartition",
        "build_s": 0.0,
        "size_mb": ads.nbytes / 1e6,
        **measure(search, queries, truth),
    }


def bench_annoy(
    metric: Metric,
    embeddings: Path,
    workdir: Path,
    args: argparse.Namespace,
    queries: np.ndarray,
    truth: np.ndarray,
) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    """Build through the production path (build_index: add items, build, save, measure recall at
    the default search_k, checksum, publish), then sweep search_k on the published file."""
    started = time.perf_counter()
    folder = build_index(
        embeddings,
        workdir / f"index-{metric}",
        metric=metric,
        n_trees=args.n_trees,
        recall_floor=0.0,
        n_jobs=args.n_jobs,
        seed=args.seed,
        recall_queries=args.queries,
    )
    build_total = time.perf_counter() - started
    manifest = read_manifest(folder)
    index = open_index(folder, verify_checksums=False)

    def searcher(search_k: int) -> Search:
        return lambda query, k: index.search(query, k, search_k)

    efforts = [args.n_trees * RECALL_K * f for f in args.search_k_factors]
    chosen, rows = sweep(f"annoy {metric}", efforts, searcher, queries, truth)
    row = {
        "method": f"annoy {metric}",
        "params": f"trees={args.n_trees} search_k={chosen}",
        "build_s": manifest["metrics"]["build_seconds"],
        "build_total_s": build_total,
        "size_mb": manifest["metrics"]["ann_bytes"] / 1e6,
        **measure(searcher(chosen), queries, truth),
    }
    index.close()
    return row, rows, folder


def bench_hnsw(
    ads: np.ndarray, workdir: Path, args: argparse.Namespace, queries: np.ndarray, truth: np.ndarray
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import hnswlib  # a dev dependency: only the benchmark compares against it

    graph = hnswlib.Index(space="ip", dim=ads.shape[1])
    graph.init_index(
        max_elements=ads.shape[0],
        ef_construction=args.hnsw_ef_construction,
        M=args.hnsw_m,
        random_seed=args.seed,
    )
    graph.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    graph.add_items(ads, np.arange(ads.shape[0]))
    build = time.perf_counter() - started
    graph.save_index(str(workdir / "hnsw.bin"))
    graph.set_num_threads(1)  # one request, one thread, as in a serving worker

    def searcher(ef: int) -> Search:
        def search(query: np.ndarray, k: int) -> np.ndarray:
            graph.set_ef(max(ef, k))
            return graph.knn_query(query, k=k)[0][0]

        return search

    chosen, rows = sweep("hnswlib ip", args.hnsw_ef, searcher, queries, truth)
    row = {
        "method": "hnswlib ip",
        "params": f"M={args.hnsw_m} efC={args.hnsw_ef_construction} ef=max({chosen},K)",
        "build_s": build,
        "size_mb": (workdir / "hnsw.bin").stat().st_size / 1e6,
        **measure(searcher(chosen), queries, truth),
    }
    return row, rows


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from candidates.service import CandidateService
    service = CandidateService.load(Path(sys.argv[1]), Path(sys.argv[2]), prefault=True,
                                    verify_checksums=False)
    np.asarray(service.embeddings.ads.vectors).sum()  # serving touches every ad row over time
    for user in range(50):
        service.candidates(f"user{user}", f"placement{user % 10}", 500)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def bench_memory(index: Path, embeddings: Path, workers: int) -> dict[str, Any]:
    """Summed PSS of N workers holding the release (index + embeddings) vs one worker; the index
    file's mapping alone is reported too, since interpreter and numpy heaps are per process."""
    usage: dict[int, tuple[float, float, float]] = {}
    for count in (1, workers):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(index), str(embeddings)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            totals = [memory_kb(p.pid) for p in procs]
            mapped = [memory_kb(p.pid, index / "ads.ann") for p in procs]
        finally:
            for proc in procs:
                proc.communicate(input="\n", timeout=60)
        usage[count] = (
            sum(t["Pss"] for t in totals) / 1024,
            sum(m["Pss"] for m in mapped) / 1024,
            sum(t["Rss"] for t in totals) / 1024,
        )
    one, many = usage[1], usage[workers]
    return {
        "workers": workers,
        "pss_1_mb": one[0],
        f"pss_{workers}_sum_mb": many[0],
        "ratio": many[0] / one[0],
        "index_pss_1_mb": one[1],
        f"index_pss_{workers}_sum_mb": many[1],
        "index_ratio": many[1] / one[1],
        f"rss_{workers}_sum_mb": many[2],
    }


def run_size(n_ads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every method on one catalogue size; returns rows for the result tables."""
    data = two_tower_like(
        n_ads=n_ads, n_users=20_000, n_placements=200, dim=args.dim, clusters=256, seed=args.seed
    )
    rng = np.random.default_rng(args.seed + 1)
    users, placements = data.vectors("users"), data.vectors("placements")
    queries = (
        users[rng.integers(0, len(users), args.queries)]
        + placements[rng.integers(0, len(placements), args.queries)]
    ).astype(np.float32)
    ads = data.vectors("ads")
    truth = exact_top_k(queries, ads, RECALL_K)  # row ids in generation order ("ad<i>" = row i)
    results: dict[str, Any] = {"rows": [], "sweep": [], "memory": None}
    with tempfile.TemporaryDirectory(prefix="bench-candidates-") as tmp:
        workdir = Path(tmp)
        emb = publish_embeddings(workdir / "embeddings", "20240105", data.tables, data.fallbacks)
        # The published table is sorted by id: map its rows back to generation order for truth.
        sorted_ids = np.load(emb / "ads_ids.npy")
        to_generation = np.array([int(raw[2:]) for raw in sorted_ids.tolist()])
        indexes: dict[str, Path] = {}
        if "exact" in args.methods:
            results["rows"].append(bench_exact(ads, queries, truth))
        for metric in ("dot", "angular"):
            if f"annoy-{metric}" in args.methods:
                row, rows, indexes[metric] = bench_annoy(
                    metric, emb, workdir, args, queries, to_published(truth, to_generation)
                )
                results["rows"].append(row)
                results["sweep"] += rows
        if "hnsw" in args.methods:
            row, rows = bench_hnsw(ads, workdir, args, queries, truth)
            results["rows"].append(row)
            results["sweep"] += rows
        memory_metric = DEFAULT_METRIC if DEFAULT_METRIC in indexes else next(iter(indexes), None)
        if memory_metric is not None:
            results["memory"] = {
                "metric": memory_metric,
                **bench_memory(indexes[memory_metric], emb, args.workers),
            }
    exact_row = next((r for r in results["rows"] if r["method"] == "exact numpy"), None)
    for row in [*results["rows"], *results["sweep"]]:
        row["n_ads"] = n_ads
        if exact_row is not None:
            for k in ("k100", "k500"):
                if f"{k}_p50_ms" in row:
                    row[f"{k}_speedup"] = exact_row[f"{k}_p50_ms"] / row[f"{k}_p50_ms"]
    return results


def to_published(truth: np.ndarray, to_generation: np.ndarray) -> np.ndarray:
    """Truth in published row numbers: ANNOY item i is row i of the sorted id table."""
    to_published_row = np.empty_like(to_generation)
    to_published_row[to_generation] = np.arange(to_generation.shape[0])
    return to_published_row[truth]


def crossing(n_ads: int, args: argparse.Namespace) -> dict[str, Any]:
    """The index build's own exact-vs-ANN measurement (manifest ``search``) for one catalogue
    size, built as the daily pipeline builds it (IndexSettings defaults, one build thread)."""
    from deepclick.settings import IndexSettings

    data = two_tower_like(
        n_ads=n_ads, n_users=20_000, n_placements=200, dim=args.dim, clusters=256, seed=args.seed
    )
    defaults = IndexSettings()
    with tempfile.TemporaryDirectory(prefix="bench-crossing-") as tmp:
        emb = publish_embeddings(Path(tmp) / "embeddings", "20240105", data.tables, data.fallbacks)
        started = time.perf_counter()
        folder = build_index(
            emb, Path(tmp) / "index", metric=defaults.metric, n_trees=defaults.n_trees,
            search_k=defaults.search_k, tune_search_k=defaults.tune_search_k,
            recall_k=defaults.recall_k, recall_floor=defaults.recall_floor, seed=args.seed,
            n_jobs=args.n_jobs,
        )  # fmt: skip
        manifest = read_manifest(folder)
    return {
        "n_ads": n_ads,
        "dim": args.dim,
        "build_s": round(time.perf_counter() - started, 1),
        "recall_k_search_k": manifest["search_k"],
        **manifest["search"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.crossing:
        rows = []
        for n_ads in args.sizes:
            rows.append(crossing(n_ads, args))
            print(rows[-1], flush=True)
        print_table("exact vs ANN as the index build records it (manifest search)", rows)
        print(f"wrote {write_json(args.name, {'config': vars(args), 'crossing': rows})}")
        return
    rows: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    for n_ads in args.sizes:
        t0 = time.perf_counter()
        result = run_size(n_ads, args)
        rows += result["rows"]
        sweeps += result["sweep"]
        if result["memory"]:
            memory.append({"n_ads": n_ads, **result["memory"]})
        print(f"{n_ads:,} ads done in {time.perf_counter() - t0:.0f} s", flush=True)
    columns = [
        "n_ads",
        "method",
        "params",
        "build_s",
        "size_mb",
        "recall@100",
        "k100_p50_ms",
        "k100_p99_ms",
        "k500_p50_ms",
        "k500_p99_ms",
        "k100_speedup",
        "k500_speedup",
    ]
    print_table(
        "candidate retrieval (speedup = exact numpy p50 / p50)",
        [{c: r.get(c) for c in columns} for r in rows],
    )
    print_table("search effort sweep (ANNOY search_k, hnswlib ef)", sweeps)
    if memory:
        print_table(f"memory: {args.workers} workers vs 1 (PSS, MB)", memory)
    path = write_json(
        args.name,
        {
            "config": vars(args),
            "target_recall": TARGET_RECALL,
            "wall_seconds": time.perf_counter() - started,
            "results": rows,
            "sweep": sweeps,
            "memory": memory,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
