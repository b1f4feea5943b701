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
