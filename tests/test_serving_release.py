"""Releases and online features: what serving loads must be exactly what the models were trained
on, and anything broken or mismatched must be refused with a reason.

The strongest check is the planted one: for rows of the features folder's ``eval`` table, the
features serving gathers from its mmapped tables and the request time give the same ranker inputs
and the same pctr as scoring those rows offline (no train/serve skew).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from serving_world import World, planted_embeddings

from candidates.index import build_index
from candidates.store import publish_embeddings, read_embeddings
from deepclick.publish import read_manifest
from lifecycle.release_writer import publish_release
from models.ranker.inputs import CANDIDATE_INDEX, frame_to_inputs
from models.ranker.predictor import InProcessPredictor
from models.ranker.similarity import EmbeddingSimilarity
from serving.features import EntityTable, request_time_features
from serving.release import (
    ENTITY_FILES,
    RELEASE_FILE,
    LoadedRelease,
    ReleaseError,
    load_release,
)


def test_release_names_its_paired_components(world: World) -> None:
    release = json.loads((world.release / RELEASE_FILE).read_text())
    assert release["version"] == "20240103"
    assert release["feature_spec"]["version"] == world.features.spec.version
    assert release["embeddings"]["version"] == release["index"]["embedding_version"] == "20240103"
    assert release["ranker"]["model_name"] == "ranker"
    assert release["ranker"]["embedding_version"] == "20240103"  # trained on these vectors
    assert release["embeddings"]["folder"] == "artifacts/embeddings/20240103"  # root-relative
    manifest = read_manifest(world.release)
    assert set(manifest["checksums"]) >= {RELEASE_FILE, *ENTITY_FILES.values()}
    assert (world.root / "releases" / "CURRENT").read_text().strip() == "20240103"


def test_entity_tables_hold_the_ranker_columns_sorted_and_memory_mapped(
    world: World, loaded: LoadedRelease
) -> None:
    ads = EntityTable.open(world.release / ENTITY_FILES["ad"], "ad_id")
    catalogue = world.features.table("entities/ads")
    assert len(ads) == len(catalogue)  # new (cold-start) ads included
    assert bool(np.all(ads.ids[1:] > ads.ids[:-1]))
    assert set(ads.columns) == {
        "ad__cate_id", "ad__brand", "ad__campaign_id", "ad__customer", "ad__price", "ad__bid",
        "ad__hist_impressions", "ad__hist_clicks", "ad__hist_ctr",
    }  # fmt: skip
    for column in [ads.ids, *ads.columns.values()]:
        assert not column.flags.owndata and not column.flags.writeable  # a view of the map
    maps = Path("/proc/self/maps").read_text()
    assert str(world.release / ENTITY_FILES["ad"]) in maps
    row = ads.row("a00007")
    expected = catalogue.set_index("ad_id").loc["a00007"]
    assert ads.columns["ad__cate_id"][row].decode() == expected["ad__cate_id"]
    assert ads.columns["ad__price"][row] == pytest.approx(expected["ad__price"], rel=1e-6)
    assert ads.row("nope") is None and ads.row("") is None and ads.row("a" * 500) is None


def test_request_time_features_follow_the_release_time_zone() -> None:
    late = dt.datetime(2024, 1, 3, 23, 30, tzinfo=dt.UTC)  # a Wednesday in UTC
    assert request_time_features(late, "UTC") == {"ctx__hour": "23", "ctx__dow": "2"}
    assert request_time_features(late, "Asia/Tokyo") == {"ctx__hour": "8", "ctx__dow": "3"}
    naive = dt.datetime(2024, 1, 3, 5, 0)  # naive = UTC
    assert request_time_features(naive, "UTC")["ctx__hour"] == "5"


def test_online_features_and_pctr_equal_offline_scoring_of_the_same_rows(
    world: World, loaded: LoadedRelease
) -> None:
    """No train/serve skew: gather from mapped tables == the features folder's own rows."""
    spec = world.features.spec
    rows = world.features.table("eval").drop_duplicates(["user_id", "ad_id"]).head(40)
    similarity = EmbeddingSimilarity(read_embeddings(world.embeddings))
    offline_inputs = frame_to_inputs(spec, rows, similarity=similarity)
    offline = InProcessPredictor(world.ranker).predict(offline_inputs)
    day = dt.date.fromisoformat(spec.target_date)
    online = []
    for i, row in enumerate(rows.itertuples(index=False)):
        when = dt.datetime.combine(day, dt.time(int(row.ctx__hour)), tzinfo=dt.UTC)
        lookup = loaded.features.lookup(row.user_id, row.placement_id)
        got = loaded.features.gather(
            row.user_id, row.placement_id, [row.ad_id], lookup=lookup, request_time=when
        )
        assert got.fallbacks == ()
        for name, values in {**got.common, **got.candidates}.items():
            if name == CANDIDATE_INDEX:  # not a feature: the ads' precomputed ranker rows
                continue
            want = offline_inputs[name][i]
            if values.dtype.kind == "S":
                assert values[0].decode() == want, name
            else:
                assert float(values[0]) == pytest.approx(float(want), rel=1e-5, abs=1e-6), name
        online.append(loaded.backend.predict(got.common, got.candidates, timeout_s=30)[0])
    np.testing.assert_allclose(online, offline, rtol=1e-5, atol=1e-6)


def test_cold_start_takes_request_features_then_spec_defaults(loaded: LoadedRelease) -> None:
    assembler = loaded.features
    supplied = assembler.check_request_features(
        "user", {"user__segment": "seg2", "user__hist_ctr": 0.5}, "user_features"
    )
    lookup = assembler.lookup("new-user", "new-placement")
    assert lookup.user_row is None and lookup.user_vector_row is None
    got = assembler.gather(
        "new-user", "new-placement", ["a00001", "not-an-ad"], lookup=lookup, user_features=supplied
    )
    assert got.common["user__segment"][0] == b"seg2"
    assert got.common["user__hist_ctr"][0] == pytest.approx(0.5)
    assert got.common["user__age_level"][0] == b"__missing__"  # not supplied: the spec's marker
    impressions = loaded.spec.feature("user__hist_impressions")
    assert got.common["user__hist_impressions"][0] == pytest.approx(impressions.default)
    assert got.candidates["ad__cate_id"][1] == b"__missing__"  # unknown ad: defaults
    assert got.candidates["sim_user_ad"][1] == 0.0  # and a zero vector
    assert set(got.fallbacks) == {
        "user_features_from_request", "user_features_default", "placement_features_default",
        "ad_features_default",
    }  # fmt: skip


def test_ad_features_no_table_holds_get_their_full_default(world: World) -> None:
    """Regression: a default string for every candidate was cut to its first byte."""
    import dataclasses

    from serving.features import EntityTable, FeatureAssembler

    loaded = load_release(world.release, world.settings(), warmup=False)
    tables = dict(loaded.features.tables)
    ads = tables["ad"]
    tables["ad"] = dataclasses.replace(
        ads, columns={k: v for k, v in ads.columns.items() if k != "ad__brand"}
    )
    assert isinstance(tables["ad"], EntityTable)
    assembler = FeatureAssembler(
        loaded.spec, loaded.features.inputs, tables, loaded.candidates.embeddings
    )
    lookup = assembler.lookup("u00001", "p001")
    got = assembler.gather("u00001", "p001", ["a00001", "a00002"], lookup=lookup)
    assert got.candidates["ad__brand"].tolist() == [b"__missing__", b"__missing__"]
    assert got.candidates["ad__cate_id"][0] != b"__missing__"  # held features still come from rows


@pytest.mark.parametrize(
    ("features", "field", "message"),
    [
        ({"user__nope": "x"}, "user__nope", "not a user feature"),
        ({"ctx__hour": "3"}, "ctx__hour", "request_time"),
        ({"user__hist_ctr": "high"}, "user__hist_ctr", "numeric"),
        ({"user__segment": 1.5}, "user__segment", "categorical"),
        ({"user_id": "u1"}, "user_id", "not a user feature"),
    ],
)
def test_request_features_are_checked_against_the_spec(
    loaded: LoadedRelease, features: dict, field: str, message: str
) -> None:
    from serving.features import RequestFieldError

    role = "context" if field.startswith("ctx") else "user"
    with pytest.raises(RequestFieldError, match=message) as caught:
        loaded.features.check_request_features(role, features, f"{role}_features")
    assert caught.value.field_path[-1] == field


def test_publish_refuses_a_ranker_trained_on_other_embeddings(world: World, tmp_path: Path) -> None:
    tables, fallbacks = planted_embeddings(world.features, seed=9)
    other = publish_embeddings(
        world.root / "artifacts" / "embeddings", "20240199", tables, fallbacks,
        update_current=False,
    )  # fmt: skip
    index = build_index(
        other, world.root / "artifacts" / "index", n_trees=4, recall_floor=0.0,
        update_current=False,
    )  # fmt: skip
    before = sorted(p.name for p in (world.root / "releases").iterdir())
    with pytest.raises(ReleaseError, match=r"embeddings '20240103'.*'20240199'"):
        publish_release(world.settings(), world.features.path, other, index, world.ranker)
    assert sorted(p.name for p in (world.root / "releases").iterdir()) == before


def test_load_refuses_an_index_that_is_not_paired_with_the_embeddings(world: World) -> None:
    with pytest.raises(ReleaseError, match=r"not paired|differs"):
        publish_release(
            world.settings(), world.features.path, world.embeddings,
            world.root / "artifacts" / "index" / "20240199", world.ranker, version="20240198",
        )  # fmt: skip


def _copy_release(world: World, name: str) -> Path:
    copy = world.root / "releases" / name
    shutil.copytree(world.release, copy)
    return copy


def test_load_refuses_an_altered_release_file(world: World) -> None:
    copy = _copy_release(world, "20240190")
    path = copy / ENTITY_FILES["ad"]
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=r"does not match its manifest \(altered: entities/ads"):
        load_release(copy, world.settings())


def test_load_refuses_a_truncated_index(world: World) -> None:
    index = world.root / "artifacts" / "index" / "20240191"
    shutil.copytree(world.index, index)
    release = publish_release(
        world.settings(), world.features.path, world.embeddings, index, world.ranker,
        version="20240191", update_current=False,
    )  # fmt: skip
    ann = index / "ads.ann"
    with ann.open("r+b") as handle:
        handle.truncate(ann.stat().st_size - 100)
    with pytest.raises(ReleaseError, match="truncated"):
        load_release(release, world.settings())


def test_load_refuses_a_component_republished_after_the_release(world: World) -> None:
    index = build_index(
        world.embeddings, world.root / "artifacts" / "index", n_trees=4, recall_floor=0.0,
        version="20240192", update_current=False,
    )  # fmt: skip
    release = publish_release(
        world.settings(), world.features.path, world.embeddings, index, world.ranker,
        version="20240192", update_current=False,
    )  # fmt: skip
    build_index(
        world.embeddings, world.root / "artifacts" / "index", n_trees=5, recall_floor=0.0,
        version="20240192", update_current=False,
    )  # fmt: skip
    with pytest.raises(ReleaseError, match="republished after this release"):
        load_release(release, world.settings())


def test_loaded_release_reports_versions_and_a_warmed_up_ranker(loaded: LoadedRelease) -> None:
    assert loaded.versions == {
        "release": "20240103", "feature_spec": "20240103", "embeddings": "20240103",
        "index": "20240103", "ranker": "20240103", "ranker_model": "ranker",
    }  # fmt: skip
    assert loaded.warmup["candidates"] > 0 and 0 < loaded.warmup["mean_pctr"] < 1
    assert len(next(iter(loaded.probe.candidates.values()))) == 1
    scores = loaded.backend.predict(loaded.probe.common, loaded.probe.candidates, timeout_s=30)
    assert scores.shape == (1,)


def test_frame_of_entities_matches_parquet_for_users(world: World) -> None:
    users = EntityTable.open(world.release / ENTITY_FILES["user"], "user_id")
    frame = pd.read_parquet(world.features.path / "entities" / "users").set_index("user_id")
    for user in ["u00000", "u00123", "u00299"]:
        row = users.row(user)
        assert users.columns["user__segment"][row].decode() == frame.loc[user, "user__segment"]
        assert users.columns["user__hist_clicks"][row] == pytest.approx(
            frame.loc[user, "user__hist_clicks"]
        )


def test_candidate_rows_feed_feature_assembly_without_decoding_ids(loaded: LoadedRelease) -> None:
    """One request assembly (issue 13 item 4): the candidate stage's integer rows are rows of the
    index, the embeddings and (mapped) the ads table, and gathering from them gives exactly the
    inputs that gathering from the decoded ad ids gives."""
    service, assembler = loaded.candidates, loaded.features
    for user, placement in (("u00010", "p003"), ("new-user", "p001"), ("u00002", "new-place")):
        parts = service.locate(user, placement)
        found = service.candidates(user, placement, 200, parts=parts)
        assert found.rows is not None and found.rows.dtype == np.int64 and len(found) == 200
        np.testing.assert_array_equal(service.index.ad_ids[found.rows], found.keys)
        np.testing.assert_array_equal(service.embeddings.ads.ids[found.rows], found.keys)
        np.testing.assert_allclose(found.user_ad + found.context_ad, found.scores, atol=1e-3)
        lookup = assembler.lookup(user, placement, parts)
        assert lookup == assembler.lookup(user, placement)  # the rows the tables hold
        by_rows = assembler.gather(user, placement, found, lookup=lookup)
        by_ids = assembler.gather(user, placement, found.ad_ids, lookup=lookup)
        assert by_rows.fallbacks == by_ids.fallbacks
        assert by_rows.candidates.keys() == by_ids.candidates.keys()
        for name, values in by_ids.candidates.items():
            if values.dtype.kind == "S":
                assert by_rows.candidates[name].tolist() == values.tolist(), name
            else:
                np.testing.assert_allclose(by_rows.candidates[name], values, rtol=1e-6)


def test_precomputed_ad_rows_score_as_the_ad_strings(loaded: LoadedRelease) -> None:
    """Issue 14: a loaded release holds every ad's rows of the ranker's candidate table, so a
    request carries its candidates' rows and no ad string is hashed per request; the scores equal
    those from the strings. An ad the ads table lacks sends strings only, and a micro-batch
    mixing both kinds of request is scored from the strings of all."""
    from serving.backends import inputs_for
    from serving.batching import BatchingBackend, _Waiting

    assembler, backend = loaded.features, loaded.backend
    user, placement = "u00010", "p003"
    parts = loaded.candidates.locate(user, placement)
    found = loaded.candidates.candidates(user, placement, 200, parts=parts)
    got = assembler.gather(user, placement, found, lookup=assembler.lookup(user, placement, parts))
    strings = {k: v for k, v in got.candidates.items() if k != CANDIDATE_INDEX}
    rows = got.candidates[CANDIDATE_INDEX]
    assert rows.shape == (200, len(loaded.backend.candidate_index(strings)[0]))
    np.testing.assert_array_equal(rows, backend.candidate_index(strings))
    with_rows = backend.predict(got.common, got.candidates, timeout_s=30)
    from_strings = backend.predict(got.common, strings, timeout_s=30)
    assert with_rows.std() > 0
    np.testing.assert_allclose(with_rows, from_strings, rtol=0, atol=1e-6)
    # the rows reach only a backend that takes them (regression: a replay's peer got them)
    assert CANDIDATE_INDEX in inputs_for(backend, got.candidates)
    assert inputs_for(object(), got.candidates).keys() == strings.keys()
    unknown = assembler.gather(
        user, placement, ["a00001", "not-an-ad"], lookup=assembler.lookup(user, placement)
    )
    assert CANDIDATE_INDEX not in unknown.candidates
    batcher = BatchingBackend(backend, max_rows=2000)  # micro-batching is off by default
    batch = [
        _Waiting(got.common, got.candidates, 200, float("inf")),
        _Waiting(unknown.common, unknown.candidates, 2, float("inf")),
    ]
    together = batcher._together(batch, 30.0)
    np.testing.assert_allclose(together[0], from_strings, rtol=0, atol=1e-6)
    alone = backend.predict(unknown.common, unknown.candidates, timeout_s=30)
    np.testing.assert_allclose(together[1], alone, rtol=0, atol=1e-6)


def test_a_known_user_not_seen_before_is_scored_without_a_string_lookup_call(
    world: World, loaded: LoadedRelease
) -> None:
    """Issue 14, the predict-stage gap: a worker met most users for the first time, and each
    first request paid a ``shared_index`` call (strings through TensorFlow, +2.5 ms measured).
    A loaded release knows every user's and placement's table row; a first-seen user is found
    there (not added to the per-value memo) and scores as the strings give."""
    backend = loaded.backend
    predictor = getattr(backend, "inner", backend).predictor  # with or without micro-batching
    assert "user_id" in predictor._known and "placement_id" in predictor._known
    user, placement = "u00123", "p005"
    parts = loaded.candidates.locate(user, placement)
    found = loaded.candidates.candidates(user, placement, 50, parts=parts)
    got = loaded.features.gather(
        user, placement, found, lookup=loaded.features.lookup(user, placement, parts)
    )
    # The request's other shared columns (placement, time of day) are memoised by a first call,
    # whatever earlier tests in this process asked: only the user's row is then in question.
    loaded.backend.predict(got.common, got.candidates, timeout_s=30)
    predictor._memo.pop("user_id", None)
    scores = loaded.backend.predict(got.common, got.candidates, timeout_s=30)
    assert user.encode() not in predictor._memo.get("user_id", {})
    fresh = InProcessPredictor(world.ranker, lite=True)  # strings → rows by shared_index
    expected = fresh.predict({**got.common, **got.candidates}, "rank")
    assert user.encode() in fresh._memo["user_id"]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
