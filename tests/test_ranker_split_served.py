"""bench/ranker_split.py --against-served: the served ranker's stored scores of D, refused unless
they are D's evaluation rows in order (a variant paired with other rows would be judged on
noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def _stored(root: Path, labels: list[int], scores: list[float]) -> None:
    from deepclick import layout

    folder = layout.evaluations_dir(root) / "20240108" / "ranking"
    folder.mkdir(parents=True)
    pd.DataFrame({"label": labels, "ranker": scores}).to_parquet(folder / "predictions.parquet")


def test_the_served_scores_of_ds_rows_are_read_in_order(tmp_path: Path) -> None:
    from bench.ranker_split import served_scores

    _stored(tmp_path, [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.7])
    scores = served_scores(tmp_path, "20240108", np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(scores, [0.1, 0.9, 0.2, 0.7])


def test_scores_of_other_rows_are_refused(tmp_path: Path) -> None:
    from bench.ranker_split import served_scores

    _stored(tmp_path, [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.7])
    with pytest.raises(SystemExit, match="not D's evaluation rows"):
        served_scores(tmp_path, "20240108", np.array([1, 0, 0, 1]))


def test_results_go_under_bench_results_by_name_not_to_the_working_folder(
    tmp_path, monkeypatch
) -> None:
    """``--out NAME`` once wrote a file called NAME into the working folder (the repo root, where
    it was committed); it names ``bench/results/NAME.json`` as every bench does."""
    import bench.common
    from bench.ranker_split import write_results

    results = tmp_path / "results"
    monkeypatch.setattr(bench.common, "RESULTS", results)
    monkeypatch.chdir(tmp_path)
    path = write_results("s15_probe", tmp_path / "medium", "2024-01-08", "20240108", {"base": {}})
    assert path == results / "s15_probe.json" and path.exists()
    assert not (tmp_path / "s15_probe").exists()
    default = write_results(None, tmp_path / "medium", "2024-01-08", "20240108", {})
    assert default.name == "ranker_split-medium-20240108.json"
