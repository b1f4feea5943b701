"""The ranker's numeric call on TensorFlow Lite (issue 14): converted at export, checked against
the SavedModel at export and at load on planted rows (OOV ads, padding, the micro-batcher's
form), and refused or replaced by the SavedModel call when its file is altered or disagrees.

Planted: the serving world's exported ranker (tests/serving_world.py), copied where a test
changes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from serving_world import World

from deepclick.layout import RANKER_MANIFEST
from deepclick.publish import IntegrityError, checksums
from models.ranker.export_tflite import (
    CHECK_FILE,
    LITE_FILE,
    MANIFEST_KEY,
    OOV_VALUE,
    TOLERANCE,
    load_cases,
)
from models.ranker.inputs import CANDIDATE_INDEX
from models.ranker.predictor import INDEXED, InProcessPredictor
from serving.release import LoadedRelease


def _copy(world: World, tmp_path: Path) -> Path:
    folder = tmp_path / "ranker" / world.ranker.name
    shutil.copytree(world.ranker, folder)
    return folder


def _reseal(folder: Path) -> None:
    """Rewrite the manifest's checksums for the folder as it is now (a file that passes the
    integrity check but is not what the export wrote)."""
    path = folder / RANKER_MANIFEST
    manifest = json.loads(path.read_text())
    manifest["checksums"] = checksums(folder, RANKER_MANIFEST)
    path.write_text(json.dumps(manifest))


def _request(loaded: LoadedRelease, n: int = 120) -> dict[str, np.ndarray]:
    user, placement = "u00010", "p003"
    parts = loaded.candidates.locate(user, placement)
    found = loaded.candidates.candidates(user, placement, n, parts=parts)
    lookup = loaded.features.lookup(user, placement, parts)
    got = loaded.features.gather(user, placement, found, lookup=lookup)
    return {**got.common, **got.candidates}


def test_export_writes_a_tflite_model_that_scores_as_the_savedmodel_on_planted_rows(
    world: World, loaded: LoadedRelease
) -> None:
    entry = json.loads((world.ranker / RANKER_MANIFEST).read_text())[MANIFEST_KEY]
    assert entry["file"] == LITE_FILE and entry["signature"] == INDEXED
    assert entry["max_abs_difference"] <= TOLERANCE
    cases = load_cases(world.ranker / CHECK_FILE)
    # the planted rows hold OOV ads, zero padding rows and the micro-batcher's form
    assert {"r0_as_sent", "r0_oov", "r0_padded", "batched"} <= set(cases)
    assert len(cases["r0_padded"][CANDIDATE_INDEX]) == len(cases["r0_oov"][CANDIDATE_INDEX]) + 12
    assert not np.array_equal(
        cases["r0_oov"][CANDIDATE_INDEX], cases["r0_as_sent"][CANDIDATE_INDEX]
    )
    assert len(cases["batched"]["shared_index"]) == len(cases["batched"][CANDIDATE_INDEX]) > 1
    lite = InProcessPredictor(world.ranker, lite=True)
    saved = InProcessPredictor(world.ranker)
    assert lite.lite and lite.lite_fallback is None and not saved.lite
    request = _request(loaded)
    oov = {**request, "ad_id": np.array([OOV_VALUE] * len(request["ad_id"]), dtype=object)}
    del oov[CANDIDATE_INDEX]  # an ad no table holds: its rows come from the strings
    for features in (request, oov):
        got, expected = lite.predict(features, "rank"), saved.predict(features, "rank")
        assert got.std() > 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert loaded.backend.describe()["call"] == "tflite"


def test_an_altered_tflite_file_fails_the_checksums_and_the_version_is_refused(
    world: World, tmp_path: Path
) -> None:
    folder = _copy(world, tmp_path)
    data = bytearray((folder / LITE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / LITE_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"altered: {LITE_FILE}"):
        InProcessPredictor(folder, lite=True)
    (folder / LITE_FILE).unlink()
    with pytest.raises(IntegrityError, match=f"missing: {LITE_FILE}"):
        InProcessPredictor(folder, lite=True)


def test_an_unreadable_or_disagreeing_tflite_model_falls_back_to_the_savedmodel_call(
    world: World, loaded: LoadedRelease, tmp_path: Path
) -> None:
    request = _request(loaded)
    expected = InProcessPredictor(world.ranker).predict(request, "rank")
    folder = _copy(world, tmp_path)
    (folder / LITE_FILE).write_bytes(b"not a flatbuffer")
    _reseal(folder)
    unreadable = InProcessPredictor(folder, lite=True)
    assert not unreadable.lite and unreadable.lite_fallback
    np.testing.assert_allclose(unreadable.predict(request, "rank"), expected, rtol=0, atol=1e-6)

    # a valid TFLite model with the same signature that scores rows by the sum of their inputs
    specs = {
        name: tf.TensorSpec(
            [None, len(cols)], tf.int32 if name.endswith("index") else tf.float32, name=name
        )
        for name, cols in unreadable._indexed_inputs().items()
    }

    class Constant(tf.Module):
        @tf.function(input_signature=[specs])
        def indexed(self, inputs: dict) -> dict:
            n = tf.shape(inputs[CANDIDATE_INDEX])[:1]
            total = [tf.reduce_sum(tf.cast(v, tf.float32), axis=1) for v in inputs.values()]
            return {"pctr": tf.sigmoid(0.01 * tf.add_n([tf.broadcast_to(t, n) for t in total]))}

    module = Constant()
    tf.saved_model.save(module, str(tmp_path / "constant"), signatures={INDEXED: module.indexed})
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(tmp_path / "constant"), signature_keys=[INDEXED]
    )
    blob = converter.convert()
    (folder / LITE_FILE).write_bytes(blob)
    _reseal(folder)
    disagreeing = InProcessPredictor(folder, lite=True)
    assert not disagreeing.lite and "differs from the SavedModel" in disagreeing.lite_fallback
    np.testing.assert_allclose(disagreeing.predict(request, "rank"), expected, rtol=0, atol=1e-6)


def test_rankings_through_the_tflite_call_are_the_savedmodel_rankings(
    world: World, loaded: LoadedRelease
) -> None:
    """Issue 14, quality stays: the same requests through serving's ranking flow give the same
    top-10 ads in the same order, and pctr to 1e-5, with the TFLite call and the SavedModel's."""
    from serving.metrics import ServingMetrics
    from serving.ranking import RankLimits, rank
    from serving.release import load_release
    from serving.schemas import RankRequest

    settings = world.settings()
    saved_settings = settings.model_copy(
        update={"predictor": settings.predictor.model_copy(update={"tflite": False})}
    )
    saved = load_release(world.release, saved_settings)
    assert saved.backend.describe()["call"] == "indexed"
    assert loaded.backend.describe()["call"] == "tflite"
    limits = RankLimits(200, 2000, 1000, 30.0)
    try:
        for user in [*world.user_ids[:12], "a-user-nobody-knows"]:
            request = RankRequest(user_id=user, placement_id="p003", num_ads=10)
            lite = rank(loaded, request, limits, ServingMetrics())
            reference = rank(saved, request, limits, ServingMetrics())
            assert not lite.degraded and not reference.degraded
            assert [a.ad_id for a in lite.ads] == [a.ad_id for a in reference.ads]
            np.testing.assert_allclose(
                [a.pctr for a in lite.ads], [a.pctr for a in reference.ads], rtol=0, atol=1e-5
            )
    finally:
        saved.close()
