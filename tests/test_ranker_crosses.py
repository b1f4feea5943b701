"""Explicit crosses in the ranker's wide part (issue 10, ``ranker.crosses``).

Planted folder (tests/feature_folder.py): a user of group ``g`` (``user__segment`` = ``seg<g>``)
clicks an ad of category ``cat<g>`` with logit ``base + 3.0``, any other ad with ``base``: the
signal is exactly one cross, segment x category, which a one-hot logistic regression cannot
express and the wide part with that cross can.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from feature_folder import FeatureFolder, write_feature_folder

from deepclick.layout import RANKER_MANIFEST
from deepclick.settings import RankerSettings
from models.evaluation.ranking import auc
from models.ranker.crosses import CrossPair, resolve_crosses
from models.ranker.export import export_ranker
from models.ranker.inputs import NumericStats, frame_to_inputs, rank_request, shared_inputs
from models.ranker.layers import CalibrationHead
from models.ranker.model import build_logit_model, with_calibration
from models.ranker.predictor import InProcessPredictor
from models.ranker.serving_graph import ServingRanker
from models.ranker.train import Split, _calibration_rows, _tensors, predict, train_ranker
from models.ranker.wide import fit_wide

MATCH = 3.0
GROUPS = 8
CROSS = ["segment*cate_id"]
SETTINGS = RankerSettings(batch_size=256, epochs=1, cross_layers=1, baseline=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("crosses"),
        users=400,
        ads=160,
        groups=GROUPS,
        impressions_per_day=5000,
        match_strength=MATCH,
        seed=1,
    )


def test_crosses_name_features_or_their_fields_and_skip_what_the_spec_lacks(
    folder: FeatureFolder,
) -> None:
    spec = folder.spec
    assert resolve_crosses(spec, ["segment*cate_id", "user__segment*ad__cate_id"]) == [
        CrossPair("user__segment", "ad__cate_id")
    ]  # the same pair once
    assert resolve_crosses(spec, ["cms_segid*cate_id", "page_type*brand"]) == [
        CrossPair("ctx__page_type", "ad__brand")
    ]  # cms_segid: not in this spec, skipped
    with pytest.raises(ValueError, match="'price' is a numeric feature"):
        resolve_crosses(spec, ["segment*price"])
    with pytest.raises(ValueError, match="write two categorical features as 'a\\*b'"):
        resolve_crosses(spec, ["segment"])
    with pytest.raises(ValueError, match="crosses user__segment with itself"):
        resolve_crosses(spec, ["segment*user__segment"])


def test_the_wide_fit_finds_the_planted_cross_a_one_hot_fit_cannot(folder: FeatureFolder) -> None:
    """The wide part alone (right after its logistic fit, the network adding 0): with the
    segment x category cross, the matching cells weigh about the planted +3.0 more than the
    others of the same segment, and D's AUC is near the oracle's; without it, far below."""
    rows = folder.table("training/ranking")
    labels = rows["label"].to_numpy()
    eval_rows = folder.table("eval")
    scores = {}
    for name, crosses in (("crossed", CROSS), ("uncrossed", [])):
        settings = SETTINGS.model_copy(update={"crosses": crosses})
        model = build_logit_model(folder.spec, settings, base_rate=float(labels.mean()))
        fit_wide(model, _tensors(model, frame_to_inputs(folder.spec, rows)), labels, c=0.1, seed=7)
        scores[name] = auc(eval_rows["label"].to_numpy(), predict(model, _eval(folder, model)))
        if crosses:
            weights = model.get_layer("wide_cross__0").get_weights()[0].reshape(-1)
            segment = model.get_layer("lookup__user__segment")
            category = model.get_layer("lookup__ad__cate_id")
            size = int(category.vocabulary_size())
            lifts = []
            for g in range(GROUPS):
                s = int(np.asarray(segment(np.array([f"seg{g}"])))[0])
                cells = [
                    weights[s * size + int(np.asarray(category(np.array([f"cat{c}"])))[0])]
                    for c in range(GROUPS)
                ]
                lifts.append(cells[g] - np.mean([w for c, w in enumerate(cells) if c != g]))
            assert 2.0 < float(np.mean(lifts)) < 3.5, lifts  # planted 3.0, shrunk by L2
            # a cell no fit row holds (an unknown segment) weighs the fit rows' mean cell weight
            probe = keras.Model(model.input, model.get_layer("cross_index__0").output)
            counts = np.bincount(
                np.asarray(
                    probe.predict(_tensors(model, frame_to_inputs(folder.spec, rows)), verbose=0)
                ),
                minlength=weights.size,
            )
            assert counts[0] == 0  # index 0: the segment lookup's OOV row
            np.testing.assert_allclose(
                weights[0], np.average(weights[counts > 0], weights=counts[counts > 0]), atol=1e-6
            )
    oracle = auc(eval_rows["label"].to_numpy(), folder.truth.eval_p_click)
    assert scores["crossed"] > oracle - 0.03, (scores, oracle)
    assert scores["uncrossed"] < oracle - 0.1, (scores, oracle)


def _eval(folder: FeatureFolder, model: keras.Model) -> dict:
    return _tensors(model, frame_to_inputs(folder.spec, folder.table("eval")))


@pytest.mark.parametrize("buckets", [1 << 18, 16], ids=["full_table", "hashed"])
def test_fused_serving_graph_scores_the_crosses_as_the_keras_model(
    folder: FeatureFolder, buckets: int
) -> None:
    """Every weight random (cross tables included), so every cross cell contributes; with 16
    buckets each 9 x 9 cross is hashed. The serving graph computes the cells from its own
    table rows, for row-aligned inputs and for one request's [1] user and placement."""
    settings = SETTINGS.model_copy(
        update={
            "crosses": [*CROSS, "page_type*brand", "age_level*cate_id"],
            "cross_buckets": buckets,
        }
    )
    sims = {n: NumericStats(n, 0.0, 1.0) for n in ("sim_user_ad", "sim_context_ad")}
    logit = build_logit_model(folder.spec, settings, similarity_stats=sims, base_rate=0.05)
    assert logit.get_layer("wide_cross__0").input_dim == (81 if buckets > 81 else 16)
    rng = np.random.default_rng(3)
    for layer in logit.layers:
        if layer.get_weights():
            layer.set_weights(
                [rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in layer.get_weights()]
            )
    model = with_calibration(logit, CalibrationHead("platt", correction=-0.5, slope=0.9))
    inputs = frame_to_inputs(folder.spec, folder.table("eval").head(300))
    inputs["sim_user_ad"] = rng.normal(0, 1, 300).astype(np.float32)
    inputs["sim_context_ad"] = rng.normal(0, 1, 300).astype(np.float32)
    inputs["ad__cate_id"][:5] = "a category never seen"  # OOV cells
    shared = shared_inputs(folder.spec)
    fused = ServingRanker(model, folder.spec, shared)
    expected = predict(model, inputs)
    np.testing.assert_allclose(fused.call(_tensors(model, inputs)).numpy(), expected, atol=1e-5)
    request = rank_request(inputs, shared, row=11)
    broadcast = {k: np.resize(v, 300) if k in shared else v for k, v in request.items()}
    np.testing.assert_allclose(
        fused.call(_tensors(model, request)).numpy(), predict(model, broadcast), atol=1e-5
    )


def test_a_crossed_ranker_exports_and_every_signature_scores_as_trained(
    folder: FeatureFolder, tmp_path: Path
) -> None:
    """End to end: trained with the cross, exported (the export itself checks ``packed`` and
    ``indexed`` against the Keras model), reloaded: the in-process predictor's indexed path
    gives the trained model's scores, and D's AUC is near the oracle's."""
    eval_rows = folder.table("eval")
    labels = eval_rows["label"].to_numpy()
    crossed = train_ranker(
        folder.spec, SETTINGS.model_copy(update={"crosses": CROSS}), progress=False
    )
    path = export_ranker(crossed, tmp_path, "ranker", "20240104")
    # the TFLite check feeds all-zero padding rows, whose table rows lie before the crossed
    # features' offsets: their cells must stay inside the cross tables (once an out-of-range
    # gather refused the file and would have failed a padded indexed call)
    lite = json.loads((path / RANKER_MANIFEST).read_text())["tflite"]
    assert "refused" not in lite, lite["refused"]
    predictor = InProcessPredictor(path, lite=True)
    assert predictor.indexed and predictor.lite, predictor.lite_fallback
    np.testing.assert_allclose(
        predictor.predict(crossed.inputs(eval_rows.head(500))),
        crossed.predict(eval_rows.head(500)),
        atol=1e-5,
    )
    assert crossed.metrics["wide_crosses"] == 1.0
    assert auc(labels, crossed.predict(eval_rows)) > auc(labels, folder.truth.eval_p_click) - 0.03


def test_calibrate_on_last_day_fits_the_head_on_the_last_held_out_day_only() -> None:
    """``calibrate_on: last_day``: of the held-out rows of days 2 and 3, the head sees day 3's."""
    held = pd.DataFrame({"date": ["2024-01-02", "2024-01-03", "2024-01-02", "2024-01-03"]})
    split = Split(
        held.iloc[:0], held, ("2024-01-02", "2024-01-03"), ("2024-01-02", "2024-01-03"), "t"
    )
    last = RankerSettings(calibrate_on="last_day")
    np.testing.assert_array_equal(_calibration_rows(split, last), [False, True, False, True])
    np.testing.assert_array_equal(_calibration_rows(split, RankerSettings()), [True] * 4)
