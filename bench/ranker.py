"""Benchmark the CTR ranker: training speed, in-process predict latency per signature, model size.

    python -m bench.ranker [--impressions-per-day 50000] [--repeats 200]

Data: the planted, contract-true features folder of ``tests/feature_folder.py`` (generated, not
committed). Training throughput covers the DCN-v2 ranker, its calibration and the hashed-LR
baseline trained in the same run on the same rows (both hold-out AUCs are printed). Predict latency
is measured on the exported SavedModel (``InProcessPredictor``) for 100 / 500 / 1000 candidates
with both signatures, alternating call by call so that machine load hits both alike, and the
``rank`` call of the same trained model exported with the fused serving graph (the default,
``models.ranker.serving_graph``) against the Keras model's own graph: CPU per call of the whole
predict (input conversion included) and of the signature call alone. Results: a table and
``bench/results/ranker.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import latency_ms, print_table, write_json
from deepclick.settings import RankerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from feature_folder import write_feature_folder

from models.ranker.export import export_ranker
from models.ranker.inputs import frame_to_inputs, rank_request
from models.ranker.predictor import InProcessPredictor
from models.ranker.train import train_ranker


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def graph_ab(
    predictors: dict[str, InProcessPredictor], inputs: dict, repeats: int, n: int = 500
) -> list[dict]:
    """CPU per ``rank`` call at ``n`` candidates of each predictor, calls interleaved: the whole
    ``predict`` (numpy → tensors → signature) and the signature call on prebuilt tensors."""
    rank = rank_request(
        {k: v[:n] for k, v in inputs.items()}, next(iter(predictors.values())).shared_inputs
    )
    cpu: dict[str, dict[str, list[float]]] = {k: {"predict": [], "call": []} for k in predictors}
    for repeat in range(repeats):
        for name, predictor in predictors.items():
            feeds = predictor._feeds(rank, "rank")
            function = predictor._functions["rank"]
            start = time.process_time()
            predictor.predict(rank, "rank")
            middle = time.process_time()
            function(**feeds)
            end = time.process_time()
            if repeat >= 5:  # warm-up
                cpu[name]["predict"].append(middle - start)
                cpu[name]["call"].append(end - middle)
    return [
        {
            "what": f"rank, {name}",
            "candidates": n,
            "cpu_ms_predict": 1000 * float(np.mean(parts["predict"])),
            "cpu_ms_signature_call": 1000 * float(np.mean(parts["call"])),
            "graph_nodes": sum(
                len(f.node_def)
                for f in predictors[name]._functions["rank"].graph.as_graph_def().library.function
            ),
        }
        for name, parts in cpu.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions-per-day", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        made = write_feature_folder(
            Path(tmp) / "features",
            impressions_per_day=args.impressions_per_day,
            users=5_000,
            ads=2_000,
        )
        settings = RankerSettings()
        started = time.perf_counter()
        trained = train_ranker(made.spec, settings, progress=False)
        total = time.perf_counter() - started
        rows = trained.metrics["fit_rows"]
        train_seconds = trained.metrics["train_seconds"]
        model = export_ranker(trained, Path(tmp) / "repo", "ranker", "20240101")
        predictor = InProcessPredictor(model)
        eval_rows = pd.read_parquet(made.path / "eval")
        inputs = frame_to_inputs(made.spec, eval_rows)
        results: list[dict] = [
            {
                "what": "train DCN-v2 + LR + calibration",
                "rows": rows,
                "seconds": train_seconds,
                "examples_per_s": rows * settings.epochs / train_seconds,
                "wall_s": total,
            },
        ]
        for n in (100, 500, 1000):
            batch = {k: v[:n] for k, v in inputs.items()}
            rank = rank_request(batch, predictor.shared_inputs)
            times: dict[str, list[float]] = {"serving_default": [], "rank": []}
            for _ in range(args.repeats):
                for signature, payload in (("serving_default", batch), ("rank", rank)):
                    start = time.perf_counter()
                    predictor.predict(payload, signature)
                    times[signature].append(time.perf_counter() - start)
            for signature, seconds in times.items():
                results.append(
                    {"what": f"predict {signature}", "candidates": n, **latency_ms(seconds)}
                )
        keras_graph = export_ranker(
            trained, Path(tmp) / "repo-keras", "ranker", "20240101", fused=False
        )
        results += graph_ab(
            {"fused graph": predictor, "Keras graph": InProcessPredictor(keras_graph)},
            inputs,
            args.repeats,
        )
        size = _folder_bytes(model)
        results.append({"what": "SavedModel size", "bytes": size})
        print_table("ranker benchmark", results)
        path = write_json(
            "ranker",
            {
                "rows": results,
                "model_bytes": size,
                "auc_holdout": trained.metrics["holdout_auc"],
                "baseline_auc_holdout": trained.metrics.get("baseline_holdout_auc"),
            },
        )
        print(
            f"holdout AUC {trained.metrics['holdout_auc']:.4f} "
            f"(LR {trained.metrics.get('baseline_holdout_auc', float('nan')):.4f}); wrote {path}"
        )


if __name__ == "__main__":
    main()
