"""The exported ranker's serving graph (issue 14): the same scores as the trained Keras model from
the same weights, with one fused table gather per side instead of two Keras lookups per feature.

No training here: a ranker is built from a planted features folder and its weights (embeddings,
wide weights, cross and deep layers) are set to seeded random values, so every part contributes
and the comparison covers all of them. The end-to-end export, reload and signature checks are in
``tests/test_ranker.py`` (they now run through this graph).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from feature_folder import FeatureFolder, write_feature_folder

from deepclick.settings import RankerSettings
from models.ranker.inputs import NumericStats, frame_to_inputs, rank_request, shared_inputs
from models.ranker.layers import CalibrationHead
from models.ranker.model import build_logit_model, with_calibration
from models.ranker.serving_graph import ServingRanker, can_fuse
from models.ranker.train import _tensors, predict

ROWS = 400


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("serving_graph"), users=200, ads=120, impressions_per_day=1500
    )


def _planted_ranker(folder: FeatureFolder, settings: RankerSettings, seed: int) -> keras.Model:
    """A calibrated ranker with every weight drawn at random (wide weights too, which training
    would set by the logistic fit), taking the two similarity inputs."""
    similarity = {
        "sim_user_ad": NumericStats("sim_user_ad", 0.2, 0.5),
        "sim_context_ad": NumericStats("sim_context_ad", -0.1, 0.3),
    }
    logit = build_logit_model(folder.spec, settings, similarity_stats=similarity, base_rate=0.05)
    rng = np.random.default_rng(seed)
    for layer in logit.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype) for w in weights])
    head = CalibrationHead("platt", correction=-0.7, slope=0.9, intercept=0.2)
    return with_calibration(logit, head)


def _inputs(folder: FeatureFolder) -> dict[str, np.ndarray]:
    rows: pd.DataFrame = folder.table("eval").head(ROWS)
    inputs = frame_to_inputs(folder.spec, rows)
    rng = np.random.default_rng(1)
    inputs["sim_user_ad"] = rng.normal(0.2, 0.5, ROWS).astype(np.float32)
    inputs["sim_context_ad"] = rng.normal(-0.1, 0.3, ROWS).astype(np.float32)
    inputs["ctx__hour"][:5] = "an hour never seen"  # out of vocabulary: the OOV rows
    return inputs


@pytest.mark.parametrize(
    "settings",
    [
        RankerSettings(baseline=False),
        RankerSettings(baseline=False, wide=False, cross_low_rank=4, hidden_units=[16]),
        RankerSettings(baseline=False, fm_blend=0.3),
        RankerSettings(baseline=False, wide=False, fm_blend=0.6, fm_dim=3),
    ],
    ids=["default_wide", "low_rank_no_wide", "window_fm", "window_fm_no_wide"],
)
def test_fused_graph_scores_equal_the_keras_model(
    folder: FeatureFolder, settings: RankerSettings
) -> None:
    model = _planted_ranker(folder, settings, seed=3)
    shared = shared_inputs(folder.spec)
    fused = ServingRanker(model, folder.spec, shared)
    inputs = _inputs(folder)
    expected = predict(model, inputs)
    assert expected.std() > 0.01  # the planted weights make the scores differ row to row
    got = fused.call(_tensors(model, inputs)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the rank form: one user and placement ([1] tensors) for every candidate
    request = rank_request(inputs, shared, row=7)
    broadcast = {k: np.resize(v, ROWS) if k in shared else v for k, v in request.items()}
    got = fused.call(_tensors(model, request)).numpy()
    np.testing.assert_allclose(got, predict(model, broadcast), atol=1e-5)


def test_fused_graph_gathers_once_per_side_not_twice_per_feature(folder: FeatureFolder) -> None:
    """Issue 14: the Keras model's per-feature embedding and wide lookups (26 gathers for 13
    features) were most of the served predict's cost; the fused graph has one per side, and
    one for all the wide part's crosses together (``ranker.crosses``, on by default)."""
    model = _planted_ranker(folder, RankerSettings(baseline=False), seed=4)
    fused = ServingRanker(model, folder.spec, shared_inputs(folder.spec))
    specs = {
        name: tf.TensorSpec([None], t.dtype) for name, t in _tensors(model, _inputs(folder)).items()
    }
    graph = tf.function(fused.call).get_concrete_function(specs).graph
    gathers = [op for op in graph.get_operations() if op.type in ("GatherV2", "ResourceGather")]
    assert len(folder.spec.categorical) >= 10
    crossed = fused.wide_crosses.table is not None
    assert crossed  # the planted spec has the default crosses' fields
    assert len(gathers) == 2 + crossed, [op.name for op in gathers]


def test_deepfm_is_not_fused(folder: FeatureFolder, tmp_path: Path) -> None:
    model = build_logit_model(folder.spec, RankerSettings(architecture="deepfm", baseline=False))
    assert not can_fuse(model)
    with pytest.raises(ValueError, match="not a DCN-v2 ranker"):
        ServingRanker(model, folder.spec, shared_inputs(folder.spec))
