"""Two-tower retrieval: shapes, the additive query, cold-start ads, planted recall, export round
trip and seeded determinism — on a synthetic features folder with a planted answer
(``feature_folder.py``: users of group g click ads of category g)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from feature_folder import FeatureFolder, write_feature_folder

from deepclick.settings import TwoTowerSettings
from models.evaluation.retrieval import plot_recall_at_k
from models.feature_spec import FeatureSpecError
from models.two_tower import (
    TrainedTowers,
    click_recall,
    export_towers,
    load_tower,
    train_two_tower,
)
from models.two_tower.model import TwoTowerModel
from models.two_tower.preprocessing import NO_ID, input_array, input_dtype
from models.two_tower.train import build_towers, read_retrieval

# Temperature 1.0 suits raw (unnormalised) dot products; the planted set is small, so a smaller
# batch gives enough steps.
SETTINGS = TwoTowerSettings(
    embedding_dim=16, hidden_units=[32], epochs=3, batch_size=256, temperature=1.0, seed=3
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    # Two OOV buckets, so unseen ids are hashed: the round trip checks the hashing is exported.
    return write_feature_folder(
        tmp_path_factory.mktemp("features") / "20240104",
        impressions_per_day=40_000,
        new_ads=24,
        oov_buckets=2,
        seed=11,
    )


@pytest.fixture(scope="module")
def trained(folder: FeatureFolder) -> TrainedTowers:
    return train_two_tower(folder.spec, SETTINGS, progress=False)


@pytest.fixture(scope="module")
def exported(trained: TrainedTowers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_towers(trained, tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module")
def clicks(folder: FeatureFolder) -> pd.DataFrame:
    """64 clicked impressions of the evaluation day, with two never-seen users."""
    frame = folder.table("eval")
    frame = frame[frame["label"] == 1].head(64).reset_index(drop=True)
    frame.loc[:1, "user_id"] = ["stranger-1", "stranger-2"]
    return frame


def test_towers_return_one_float32_vector_per_row(
    trained: TrainedTowers, clicks: pd.DataFrame
) -> None:
    assert trained.roles == ("user", "context", "time", "ad")
    for role in trained.roles:
        vectors = trained.embed(role, clicks.head(5))
        assert vectors.shape == (5, SETTINGS.embedding_dim)
        assert vectors.dtype == np.float32
    assert trained.embed("ad", clicks.head(0)).shape == (0, SETTINGS.embedding_dim)


def test_request_time_features_feed_the_time_tower_only(trained: TrainedTowers) -> None:
    context = [f.name for f in trained.features("context")]
    assert context[0] == "placement_id"
    assert "ctx__hour" not in context and "ctx__dow" not in context
    assert [f.name for f in trained.features("time")] == ["ctx__hour", "ctx__dow"]
    ad = {f.name for f in trained.features("ad")}
    assert {"ad_id", "ad__cate_id", "ad__brand", "ad__customer", "ad__price"} <= ad


def test_export_round_trip_gives_the_in_memory_vectors(
    trained: TrainedTowers, exported: dict[str, Path], clicks: pd.DataFrame
) -> None:
    assert set(exported) == {"user", "context", "time", "ad"}
    for role, path in exported.items():
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        _, specs = signature.structured_input_signature
        features = trained.features(role)
        assert set(specs) == {f.name for f in features}
        for f in features:
            assert specs[f.name].dtype == (tf.string if f.kind == "categorical" else tf.float32)
        raw = {
            f.name: tf.constant(clicks[f.name].astype(str).to_numpy())
            if f.kind == "categorical"
            else tf.constant(clicks[f.name].to_numpy(np.float32))
            for f in features
        }
        served = signature(**raw)["embedding"].numpy()
        assert served.shape == (len(clicks), SETTINGS.embedding_dim)
        np.testing.assert_allclose(served, trained.embed(role, clicks), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(load_tower(path)(clicks), served, rtol=1e-6, atol=1e-6)


def test_query_score_is_the_sum_of_the_exported_parts(
    trained: TrainedTowers, exported: dict[str, Path], clicks: pd.DataFrame, folder: FeatureFolder
) -> None:
    towers = {role: load_tower(path) for role, path in exported.items()}
    user, context, time, ad = (towers[r](clicks) for r in ("user", "context", "time", "ad"))
    model: TwoTowerModel = trained.model
    batch = {
        f.name: clicks[f.name].astype(str).to_numpy()
        if f.kind == "categorical"
        else clicks[f.name].to_numpy(np.float32)
        for role in trained.roles
        for f in trained.features(role)
    }
    in_memory = model.scores(batch).numpy()  # what training optimised: (user+context+time)·ad
    served = user @ ad.T + context @ ad.T
    np.testing.assert_allclose(served + time @ ad.T, in_memory, rtol=1e-4, atol=1e-4)
    # The exported time vector is centred on the training clicks' request times, so the published
    # user·ad + context·ad is the model score averaged over request time.
    history = folder.table("training/retrieval")
    assert np.abs(towers["time"](history).mean(axis=0)).max() < 1e-4


def test_a_new_ad_gets_a_vector_from_its_features(
    trained: TrainedTowers, folder: FeatureFolder
) -> None:
    ads = folder.table("entities/ads")
    vocabulary = set(folder.spec.vocabulary("ad_id"))
    new = ads[ads["ad_id"].isin(folder.truth.new_ads)].reset_index(drop=True)
    assert len(new) >= 20 and not set(new["ad_id"]) & vocabulary  # never clicked: ids are OOV
    known = ads[ads["ad_id"].isin(vocabulary)]
    pure_oov = pd.DataFrame({f.name: [None] for f in trained.features("ad")})
    pure_oov["ad_id"] = "never-seen"
    default = trained.embed("ad", pure_oov)[0]
    vectors = trained.embed("ad", new)
    assert (np.linalg.norm(vectors - default, axis=1) > 0.1 * np.linalg.norm(default)).all()

    # Closer to known ads of its own category than to those of any other (chance: 1 in 8).
    known_vectors = trained.embed("ad", known)
    category = known["ad__cate_id"].to_numpy()
    names = np.unique(category)
    distance = np.stack(
        [
            np.linalg.norm(known_vectors[category == c][None] - vectors[:, None], axis=2).mean(1)
            for c in names
        ],
        axis=1,
    )
    nearest = names[distance.argmin(axis=1)]
    assert np.mean(nearest == new["ad__cate_id"].to_numpy()) >= 0.75

    # And it scores higher for users of the group that clicks its category (the planted match).
    clicks = folder.table("eval")
    clicks = clicks[clicks["label"] == 1]
    queries = trained.embed("user", clicks) + trained.embed("context", clicks)
    group = clicks["user_id"].map(folder.truth.user_group).to_numpy()
    own = new["ad_id"].map(folder.truth.ad_category).to_numpy()
    scores = queries @ vectors.T
    mine = np.array([scores[group == g, j].mean() for j, g in enumerate(own)])
    others = np.array([scores[group != g, j].mean() for j, g in enumerate(own)])
    assert np.mean(mine > others) >= 0.75


def test_no_id_is_the_zeroed_id_that_id_dropout_trained(
    trained: TrainedTowers, folder: FeatureFolder, exported: dict[str, Path]
) -> None:
    """Id dropout teaches the towers what "no id" looks like: a zeroed id embedding. ``NO_ID``
    asks for exactly that, in memory and in the exported tower, while an unknown id keeps the OOV
    row the rare ids trained (those rare ads and users keep their vectors;
    docs/history/model-quality.md, sessions 20 and 21)."""
    ads = folder.table("entities/ads")
    known = ads[ads["ad_id"].isin(set(folder.spec.vocabulary("ad_id")))].head(200)
    tower = trained.tower("ad")
    index = [f.name for f in tower.features].index("ad_id")
    inputs = {f.name: input_array(known[f.name], input_dtype(f)) for f in tower.features}
    parts = [
        encoder(inputs[f.name])
        if i != index
        else tf.zeros([len(known), encoder.embedding.output_dim])
        for i, (f, encoder) in enumerate(zip(tower.features, tower.encoders, strict=True))
    ]
    x = tf.concat(parts, axis=-1)
    for layer in tower.hidden:
        x = layer(x)
    without_id = np.asarray(tower.output_layer(x)) + trained.offsets["ad"]
    no_id = known.assign(ad_id=NO_ID)
    np.testing.assert_allclose(trained.embed("ad", no_id), without_id, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(load_tower(exported["ad"])(no_id), without_id, rtol=1e-5, atol=1e-5)
    unknown = known.assign(ad_id="never-seen-" + known["ad_id"].astype(str))
    assert np.abs(trained.embed("ad", unknown) - without_id).max() > 1e-3


def test_recall_of_planted_clicks_beats_popularity(trained: TrainedTowers, tmp_path: Path) -> None:
    curves = click_recall(trained, ks=(10, 20, 50))
    model, popular = curves["two_tower"], curves["popularity"]
    for k in (10, 20, 50):
        assert model[k] >= 1.4 * popular[k], curves
        assert model[k] >= popular[k] + 0.08, curves
    assert plot_recall_at_k(curves, tmp_path / "recall.png").is_file()


def test_load_tower_names_missing_columns_and_fills_them_on_request(
    exported: dict[str, Path],
) -> None:
    tower = load_tower(exported["user"])
    assert tower.role == "user" and tower.feature_names[0] == "user_id"
    with pytest.raises(KeyError, match="user__segment"):
        tower(pd.DataFrame({"user_id": ["u00001"]}))
    cold = tower(pd.DataFrame({"user_id": ["u00001", "stranger"]}), fill_missing=True)
    assert cold.shape == (2, tower.dim) and np.isfinite(cold).all()
    unknown = tower(pd.DataFrame({"user_id": [None]}), fill_missing=True)[0]
    np.testing.assert_allclose(tower.fallback(), unknown, rtol=1e-6)


def test_seeded_training_gives_the_same_vectors(
    trained: TrainedTowers, folder: FeatureFolder
) -> None:
    ads = folder.table("entities/ads")
    again = train_two_tower(folder.spec, SETTINGS, progress=False)
    np.testing.assert_allclose(
        again.embed("ad", ads), trained.embed("ad", ads), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(again.offsets["context"], trained.offsets["context"], atol=1e-5)
    assert again.history["loss"] == pytest.approx(trained.history["loss"], rel=1e-5)


def test_training_on_chosen_days_reads_only_their_clicks(folder: FeatureFolder) -> None:
    first = folder.spec.train_dates[0]
    clicks = folder.table("training/retrieval")
    on_first = int((pd.to_datetime(clicks["date"]).dt.strftime("%Y-%m-%d") == first).sum())
    towers = build_towers(folder.spec, SETTINGS)
    columns = [*{f.name for t in towers.values() for f in t.features}, "ad_id", "ad_log_q"]
    assert len(read_retrieval(folder.spec, columns, [first])) == on_first < len(clicks)
    with pytest.raises(FeatureSpecError, match="0 clicked rows on 1999-01-01"):
        read_retrieval(folder.spec, columns, ["1999-01-01"])


def test_mixed_negative_loss_corrects_each_source_by_its_sampling_rate(
    folder: FeatureFolder,
) -> None:
    """Mixed negatives (Yang et al., WWW 2020): the softmax over B in-batch ads and M uniform
    catalogue ads, each corrected by log(how often its source proposes it) — log(B·q_j) in the
    batch, log(M/N) from the catalogue — with the positive's own ad masked in both. A one-ad
    catalogue makes the uniform draw certain, so the loss is checked against numpy by hand."""
    towers = build_towers(folder.spec, SETTINGS)
    clicks = folder.table("training/retrieval").head(6).reset_index(drop=True)
    clicks.loc[3, "ad_id"] = clicks.loc[0, "ad_id"]  # an in-batch duplicate of row 0's ad
    features = [f for tower in towers.values() for f in tower.features]
    batch = {
        f.name: clicks[f.name].astype(str).to_numpy()
        if f.kind == "categorical"
        else clicks[f.name].to_numpy(np.float32)
        for f in features
    }
    batch["ad_id"] = clicks["ad_id"].astype(str).to_numpy()
    batch["ad_log_q"] = np.log([0.5, 0.1, 0.2, 0.5, 0.05, 0.15]).astype(np.float32)
    one_ad = {f.name: batch[f.name][1:2] for f in towers["ad"].features}  # row 1's ad
    model = TwoTowerModel(towers, temperature=0.5, catalogue=one_ad, uniform_negatives=3, seed=1)
    out = model(batch)
    q, a = out["query"].numpy(), out["candidate"].numpy()
    in_batch = q @ a.T / 0.5 - batch["ad_log_q"][None, :] - np.log(6)
    ids = batch["ad_id"]
    in_batch[(ids[:, None] == ids[None, :]) & ~np.eye(6, dtype=bool)] = -1e9
    drawn = np.asarray(model.ad_tower(one_ad))[0]
    uniform = np.repeat((q @ drawn / 0.5 - np.log(3 / 1))[:, None], 3, axis=1)
    uniform[ids == ids[1]] = -1e9  # row 1 drew its own ad: not a negative
    logits = np.concatenate([in_batch, uniform], axis=1)
    log_softmax = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))[:, None]
        - logits.max(1, keepdims=True)
    )
    expected = -np.mean(log_softmax[np.arange(6), np.arange(6)])
    loss = float(model.compute_loss(batch, y_pred=out))
    assert loss == pytest.approx(expected, rel=1e-4)
    without = TwoTowerModel(towers, temperature=0.5)
    assert float(without.compute_loss(batch, y_pred=out)) < loss  # more negatives, more loss
    with pytest.raises(ValueError, match="needs a catalogue of ad features"):
        TwoTowerModel(towers, temperature=0.5, uniform_negatives=3)


@pytest.mark.spark
def test_driver_embedding_gives_the_vectors_of_the_spark_job(
    folder: FeatureFolder, exported: dict[str, Path], spark
) -> None:
    """The embed stage's two routes (``two_tower.embed_on``) publish the same vectors: Spark's
    ``mapInPandas`` job, which a cluster runs, and the driver's own pass, which a local master
    takes. Unknown ids (the new ads) and missing side values go through both."""
    from pipelines.embed import ads_without_training_rows, embed_frame, embed_in_driver

    table = folder.path / "entities" / "ads"
    tower = load_tower(exported["ad"])
    new_ads = ads_without_training_rows(folder.path)
    assert new_ads == set(folder.truth.new_ads)  # the planted new ads have no training rows
    ids, vectors = embed_in_driver(table, tower, "ad_id", new_ads)
    rows = embed_frame(
        spark.read.parquet(str(table)), str(exported["ad"]), "ad_id", tower.feature_names, new_ads
    ).toPandas()
    by_id = dict(zip(rows["id"], rows["vector"], strict=True))
    assert sorted(ids) == sorted(by_id) and len(ids) == len(folder.table("entities/ads"))
    np.testing.assert_allclose(vectors, np.stack([by_id[i] for i in ids]), rtol=1e-6, atol=1e-6)
    assert vectors.shape == (len(ids), tower.dim) and vectors.dtype == np.float32
    # Both routes embed the ads without training rows as "no id", the others under their ids.
    ads = folder.table("entities/ads").set_index("ad_id").loc[ids].reset_index()
    new = ads["ad_id"].isin(new_ads).to_numpy()
    expected = tower(ads.assign(ad_id=np.where(new, NO_ID, ads["ad_id"])), fill_missing=True)
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(vectors[new] - tower(ads[new], fill_missing=True)).max() > 1e-3
