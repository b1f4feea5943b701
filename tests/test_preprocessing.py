"""The towers and the ranker preprocess a raw value identically (issue 13, item 3: one spec-driven
preprocessing, the drift resolved on purpose).

A three-feature spec with values worked out by hand: ``ad__category`` (vocabulary ``shoes, hats,
hats, __missing__``: a duplicate line is dropped; 2 OOV buckets, so ``shoes`` = 2, ``hats`` = 3,
``__missing__`` = 4 and an unseen value hashes into 0 or 1), ``ad__price`` (log1p, mean 1, std 2,
default e - 1, which standardises to 0) and ``user__age`` (mean 30, std 10, default 30).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from deepclick.settings import RankerSettings  # noqa: E402
from models.feature_spec import (  # noqa: E402
    CLIP_STD,
    MISSING,
    Feature,
    FeatureSpec,
    NumericStats,
)
from models.preprocessing import (  # noqa: E402
    LEGACY_RANKER_CLIP,
    OOV_TOKEN,
    Standardize,
    clean_vocabulary,
)
from models.ranker.inputs import frame_to_inputs  # noqa: E402
from models.ranker.model import build_logit_model  # noqa: E402
from models.two_tower.preprocessing import input_array, input_dtype  # noqa: E402
from models.two_tower.towers import Tower, tower_features  # noqa: E402

CATEGORIES = ["shoes", "hats", "", "boots", None, MISSING]
"""Raw values: known, known, empty, unseen, null, the missing marker itself."""
EXPECTED_INDEX = [2, 3, 4, None, 4, 4]  # None: an OOV bucket (0 or 1), the same in both models
PRICES = [math.e**3 - 1, None, -4.0, 1e30, float("nan"), -1e30]
# log1p → 3 → (3 - 1) / 2 = 1; null → default e - 1 → 0; < 0 → log1p(0) = 0 → -0.5;
# 1e30 → log1p ≈ 69.1 → 34 → clipped; NaN → 0; -1e30 → log1p(0) → -0.5
EXPECTED_PRICE = [1.0, 0.0, -0.5, CLIP_STD, 0.0, -0.5]
AGES = [45.0, None, 1e6, -1e6, 30.0, float("nan")]
EXPECTED_AGE = [1.5, 0.0, CLIP_STD, -CLIP_STD, 0.0, 0.0]


def _spec(folder: Path) -> FeatureSpec:
    (folder / "vocab").mkdir(parents=True)
    (folder / "vocab" / "ad__category.txt").write_text(f"shoes\nhats\nhats\n{MISSING}\n")
    features = (
        Feature("user__age", "user", "numeric", "double", "side", mean=30.0, std=10.0, default=30),
        Feature(
            "ad__category",
            "ad",
            "categorical",
            "string",
            "side",
            vocabulary_file="vocab/ad__category.txt",
            vocabulary_size=3,
            oov_buckets=2,
            default=MISSING,
        ),
        Feature(
            "ad__price", "ad", "numeric", "double", "side", mean=1.0, std=2.0, log1p=True,
            default=math.e - 1,
        ),
    )  # fmt: skip
    return FeatureSpec(
        version="20240102",
        dataset="planted",
        target_date="2024-01-02",
        train_dates=("2024-01-01",),
        global_ctr=0.1,
        ctr_prior_strength=10.0,
        features=features,
        entities={},
        folder=folder,
    )


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> FeatureSpec:
    return _spec(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def ranker_outputs(spec: FeatureSpec) -> dict[str, np.ndarray]:
    """The ranker's lookup index and standardised numbers, read from inside the real model."""
    model = build_logit_model(spec, RankerSettings())
    probe = keras.Model(
        model.inputs,
        [model.get_layer("lookup__ad__category").output, model.get_layer("standardize").output],
    )
    frame = pd.DataFrame({"ad__category": CATEGORIES, "ad__price": PRICES, "user__age": AGES})
    index, dense = probe(frame_to_inputs(spec, frame))
    numbers = np.asarray(dense)  # columns in spec order of the numeric features
    return {"index": np.asarray(index), "user__age": numbers[:, 0], "ad__price": numbers[:, 1]}


@pytest.fixture(scope="module")
def tower_outputs(spec: FeatureSpec) -> dict[str, np.ndarray]:
    """The same from the towers' encoders (the ad tower and the user tower)."""
    out: dict[str, np.ndarray] = {}
    raw = {"ad__category": CATEGORIES, "ad__price": PRICES, "user__age": AGES}
    for role in ("ad", "user"):
        features = tower_features(spec, role)
        tower = Tower(
            spec, role, features, embedding_dim=2, feature_embedding_dim=2, hidden_units=()
        )
        for feature, encoder in zip(features, tower.encoders, strict=True):
            values = input_array(raw[feature.name], input_dtype(feature))
            if feature.kind == "categorical":
                out["index"] = np.asarray(encoder.lookup(values))
            else:
                out[feature.name] = np.asarray(encoder(values))[:, 0]
    return out


def test_both_models_look_up_a_category_alike(ranker_outputs, tower_outputs) -> None:
    towers, ranker = tower_outputs["index"], ranker_outputs["index"]
    np.testing.assert_array_equal(towers, ranker)
    for got, expected in zip(towers.tolist(), EXPECTED_INDEX, strict=True):
        if expected is None:
            assert got in (0, 1), "an unseen value must land in one of the 2 OOV buckets"
        else:
            assert got == expected


@pytest.mark.parametrize(
    ("name", "expected"), [("ad__price", EXPECTED_PRICE), ("user__age", EXPECTED_AGE)]
)
def test_both_models_standardise_a_number_alike(ranker_outputs, tower_outputs, name, expected):
    np.testing.assert_allclose(tower_outputs[name], ranker_outputs[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(tower_outputs[name], expected, atol=1e-5)


def test_the_lr_baseline_standardises_as_the_graph_does(spec: FeatureSpec) -> None:
    stats = NumericStats.of(spec.feature("ad__price"))
    prices = np.array(PRICES, dtype=np.float64)  # None → NaN, as frame_to_inputs leaves it
    np.testing.assert_allclose(stats.standardize(prices), EXPECTED_PRICE, atol=1e-6)


def test_vocabulary_drops_duplicates_empty_and_the_oov_token() -> None:
    values = ["a", "", "b", "a", OOV_TOKEN, "c"]
    assert clean_vocabulary(values, MISSING) == ["a", "b", "c"]
    assert clean_vocabulary([], MISSING) == [MISSING], "an empty vocabulary keeps the marker"


def test_a_ranker_standardize_saved_before_the_shared_clip_keeps_its_clip() -> None:
    """Configs written by the ranker's old ``Standardize`` have no ``clip``: they clipped at ±10."""
    old = {"name": "standardize", "stats": [{"name": "x", "mean": 0.0, "std": 1.0,
                                             "log1p": False, "default": 0.0}]}  # fmt: skip
    layer = Standardize.from_config(old)
    assert layer.clip == LEGACY_RANKER_CLIP == 10.0
    np.testing.assert_allclose(
        np.asarray(layer(np.array([50.0, -7.0], np.float32)))[:, 0], [10, -7]
    )
    restored = Standardize.from_config(Standardize(old["stats"], name="s").get_config())
    assert restored.clip == CLIP_STD
