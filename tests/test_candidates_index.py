"""The ANNOY index (contracts §5): build, publish, measured recall, and refusal of bad folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from candidates.index import (
    CandidateIndexError,
    build_index,
    mips_augment,
    node_bytes,
    open_index,
    sample_queries,
)
from candidates.store import publish_embeddings, read_embeddings
from candidates.synthetic import SyntheticEmbeddings, two_tower_like
from deepclick.publish import IntegrityError, PublishError, current_version, read_manifest

VERSION = "20240105"
DIM = 32
SEARCH_K = 3000


@pytest.fixture(scope="module")
def planted() -> SyntheticEmbeddings:
    """300 tight clusters of ~10 ads: a user's nearest ads are exactly its own cluster's ads."""
    return two_tower_like(
        n_ads=3000,
        n_users=200,
        n_placements=8,
        dim=DIM,
        clusters=300,
        spread=0.05,
        norm_sigma=0.05,
        placement_scale=0.1,
        seed=1,
    )


@pytest.fixture(scope="module")
def published(planted: SyntheticEmbeddings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embeddings and a 10-tree index published under one root; returns the root."""
    root = tmp_path_factory.mktemp("published")
    emb = publish_embeddings(root / "embeddings", VERSION, planted.tables, planted.fallbacks)
    build_index(emb, root / "index", metric="dot", n_trees=10, search_k=SEARCH_K, recall_floor=0.9)
    return root


def exact_ids(planted: SyntheticEmbeddings, query: np.ndarray, k: int) -> set[str]:
    scores = planted.vectors("ads") @ query
    return {str(planted.ids("ads")[i]) for i in np.argsort(-scores)[:k]}


def test_mips_augment_equalises_norms_and_keeps_dot_products() -> None:
    ads = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
    augmented = mips_augment(ads)
    np.testing.assert_allclose(augmented[:, 2], [0.0, np.sqrt(24.0), 5.0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(augmented, axis=1), [5.0, 5.0, 5.0], rtol=1e-6)
    query = np.array([2.0, -1.0, 0.0], np.float32)  # queries get 0 in the extra coordinate
    np.testing.assert_allclose(augmented @ query, ads @ query[:2])


def test_node_size_matches_annoy_file_layout(published: Path) -> None:
    folder = published / "index" / VERSION
    manifest = read_manifest(folder)
    size = (folder / "ads.ann").stat().st_size
    assert node_bytes(DIM, "dot") == 16 + 4 * DIM and node_bytes(DIM, "angular") == 12 + 4 * 33
    assert size == manifest["counts"]["ann_nodes"] * node_bytes(DIM, "dot")


def test_manifest_records_the_build(published: Path) -> None:
    manifest = read_manifest(published / "index" / VERSION)
    assert current_version(published / "index") == VERSION
    assert manifest["embedding_version"] == VERSION and manifest["inputs"]["embeddings"] == VERSION
    assert (manifest["metric"], manifest["dim"], manifest["n_trees"], manifest["seed"]) == (
        "dot",
        DIM,
        10,
        7,
    )
    assert manifest["counts"]["ads"] == 3000
    assert manifest["ann_recall_at_k"] >= 0.9
    assert set(manifest["checksums"]) == {
        "ads.ann",
        "ads_ids.npy",
        "ads_columns.npy",
        "fresh.npy",
        "popular.json",
        "prior.npy",
    }


WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from candidates.service import CandidateService
    service = CandidateService.load(Path(sys.argv[1]), Path(sys.argv[2]), popular_quota=0.0)
    queries, sizes = np.load(sys.argv[3]), json.loads(sys.argv[4])
    answers = [service.candidates(None, None, k, user_vector=q, placement_vector=0 * q).ad_ids
               for q, k in zip(queries, sizes)]
    print(json.dumps(answers))
    """
)


def test_index_loaded_in_another_process_finds_the_exact_neighbours(
    planted: SyntheticEmbeddings, published: Path, tmp_path: Path
) -> None:
    """Each query is a user plus a placement; its k = the size of the user's cluster, so the exact
    answer is that cluster (checked here too) and ANN must return exactly it."""
    users, placements = planted.vectors("users")[:30], planted.vectors("placements")
    queries = users + placements[np.arange(30) % len(placements)]
    members = [set(np.flatnonzero(planted.ad_cluster == c)) for c in planted.user_cluster[:30]]
    np.save(tmp_path / "queries.npy", queries)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WORKER,
            str(published / "index" / VERSION),
            str(published / "embeddings" / VERSION),
            str(tmp_path / "queries.npy"),
            json.dumps([len(m) for m in members]),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    answers = json.loads(run.stdout)

    for query, cluster, ids in zip(queries, members, answers, strict=True):
        assert exact_ids(planted, query, len(cluster)) == {f"ad{i}" for i in cluster}
        assert set(ids) == {f"ad{i}" for i in cluster}


def test_recorded_recall_is_recall_against_exact_search(tmp_path: Path) -> None:
    """On overlapping clusters ANN is imperfect: the manifest value must be the measured one, and
    more trees must measure higher."""
    data = two_tower_like(n_ads=20_000, n_users=500, n_placements=10, dim=DIM, clusters=32, seed=2)
    emb = publish_embeddings(tmp_path / "emb", VERSION, data.tables, data.fallbacks)
    common = {"metric": "dot", "recall_floor": 0.0}  # the synthetic set suits dot (index.py)
    good = build_index(emb, tmp_path / "good", n_trees=20, search_k=10_000, **common)
    poor = build_index(emb, tmp_path / "poor", n_trees=1, search_k=100, **common)

    queries = sample_queries(read_embeddings(emb), 200, seed=7)
    exact = np.argsort(-(queries @ data.vectors("ads").T), axis=1)[:, :100]
    exact_sets = [{f"ad{i}" for i in row} for row in exact]  # synthetic row i is "ad<i>"
    index = open_index(good)
    found = [[index.ad_ids[r].decode() for r in index.search(q, 100, 10_000)] for q in queries]
    measured = np.mean([len(set(f) & e) / 100 for f, e in zip(found, exact_sets, strict=True)])

    recorded = read_manifest(good)["ann_recall_at_k"]
    assert recorded == pytest.approx(measured, abs=2e-4)
    assert recorded >= 0.9
    assert read_manifest(poor)["ann_recall_at_k"] < recorded - 0.2


def test_tuning_raises_search_k_until_the_floor_is_met(tmp_path: Path) -> None:
    """20 trees at ANNOY's default effort (20 * 100) miss the floor on this set; tuning doubles
    the effort until it is met and records the value serving must use."""
    data = two_tower_like(n_ads=20_000, n_users=500, n_placements=10, dim=DIM, clusters=32, seed=2)
    emb = publish_embeddings(tmp_path / "emb", VERSION, data.tables, data.fallbacks)
    with pytest.raises(PublishError, match=r"below the floor 0\.95"):
        build_index(emb, tmp_path / "plain", metric="dot", n_trees=20, recall_floor=0.95)
    tuned = read_manifest(
        build_index(
            emb,
            tmp_path / "tuned",
            metric="dot",
            n_trees=20,
            recall_floor=0.95,
            tune_search_k=True,
        )
    )
    assert tuned["search_k_tuned"] is True
    assert tuned["search_k"] in (4000, 8000, 16000, 32000, 64000)
    assert tuned["ann_recall_at_k"] >= 0.95


def test_angular_over_augmented_vectors_finds_the_same_neighbours(
    planted: SyntheticEmbeddings, published: Path, tmp_path: Path
) -> None:
    emb = published / "embeddings" / VERSION
    folder = build_index(emb, tmp_path, metric="angular", n_trees=10, search_k=SEARCH_K)
    index = open_index(folder)
    assert read_manifest(folder)["metric"] == "angular" and index.annoy.f == DIM + 1
    for query in planted.vectors("users")[:30]:
        ids = {index.ad_ids[r].decode() for r in index.search(query, 10, SEARCH_K)}
        assert ids == exact_ids(planted, query, 10)


def test_rebuild_with_the_same_seed_is_byte_identical(published: Path, tmp_path: Path) -> None:
    emb = published / "embeddings" / VERSION
    first = read_manifest(build_index(emb, tmp_path / "a", n_trees=5, recall_floor=0.0))
    again = read_manifest(build_index(emb, tmp_path / "b", n_trees=5, recall_floor=0.0))
    other = read_manifest(build_index(emb, tmp_path / "c", n_trees=5, seed=8, recall_floor=0.0))
    assert first["checksums"] == again["checksums"]
    assert first["checksums"]["ads.ann"] != other["checksums"]["ads.ann"]


def test_build_below_the_recall_floor_publishes_nothing(published: Path, tmp_path: Path) -> None:
    emb, parent = published / "embeddings" / VERSION, tmp_path / "index"
    build_index(emb, parent, n_trees=10, search_k=SEARCH_K, version="20240104")
    with pytest.raises(PublishError, match=r"recall@100 = 0\.\d+ is below the floor 0.9"):
        build_index(emb, parent, n_trees=1, search_k=1, recall_floor=0.9)
    assert current_version(parent) == "20240104"
    assert sorted(p.name for p in parent.iterdir()) == ["20240104", "CURRENT"]


@pytest.fixture
def index_copy(published: Path, tmp_path: Path) -> Path:
    """A private copy of the published index, free to damage."""
    return Path(shutil.copytree(published / "index" / VERSION, tmp_path / VERSION))


def test_corrupted_index_bytes_fail_checksum(index_copy: Path) -> None:
    ann = index_copy / "ads.ann"
    with ann.open("r+b") as handle:
        handle.seek(ann.stat().st_size // 2)
        handle.write(b"\xff" * 64)
    with pytest.raises(IntegrityError, match=r"does not match its manifest \(altered: ads.ann\)"):
        open_index(index_copy)


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_truncated_index_is_refused_before_annoy_maps_it(
    index_copy: Path, verify_checksums: bool
) -> None:
    ann, node = index_copy / "ads.ann", node_bytes(DIM, "dot")
    size = ann.stat().st_size
    nodes = size // node
    with ann.open("r+b") as handle:
        handle.truncate(size - 7)
    with pytest.raises(CandidateIndexError, match=rf"ads.ann: {size - 7} bytes is not a whole"):
        open_index(index_copy, verify_checksums=verify_checksums)
    with ann.open("r+b") as handle:
        handle.truncate(size - 3 * node)
    with pytest.raises(
        CandidateIndexError,
        match=rf"holds {nodes - 3} {node}-byte nodes .* manifest records {nodes}: the file is "
        "truncated",
    ):
        open_index(index_copy, verify_checksums=verify_checksums)


def test_id_map_of_the_wrong_length_is_refused(index_copy: Path) -> None:
    ids = np.load(index_copy / "ads_ids.npy")
    np.save(index_copy / "ads_ids.npy", ids[:-1])
    with pytest.raises(
        CandidateIndexError, match=r"ads_ids.npy: has 2999 ids but the index has 3000"
    ):
        open_index(index_copy)


def test_index_read_with_another_dimension_is_refused(index_copy: Path) -> None:
    manifest = read_manifest(index_copy)
    manifest["dim"] = DIM + 8
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CandidateIndexError, match=rf"ads.ann: .*dim {DIM + 8}, metric dot"):
        open_index(index_copy)


@pytest.mark.parametrize("n_ads", [1, 7, 35])
def test_small_catalogue_index_opens_as_its_readers_open_it(tmp_path: Path, n_ads: int) -> None:
    """Issue 11 item 2: a catalogue that fits in one ANNOY leaf loads with another tree count
    than was built (1 ad, 100 trees: 201); the published index must still open and serve."""
    small = two_tower_like(
        n_ads=n_ads, n_users=20, n_placements=2, dim=DIM, clusters=1, spread=0.5, seed=3
    )
    emb = publish_embeddings(tmp_path / "embeddings", VERSION, small.tables, small.fallbacks)
    folder = build_index(emb, tmp_path / "index", metric="angular", n_trees=100, recall_floor=0.9)
    index = open_index(folder)
    try:
        assert index.manifest["n_trees"] == 100
        assert index.manifest["ann_recall_at_k"] == 1.0
        query = small.vectors("users")[0]
        found = index.search(query, n_ads)
        assert sorted(found) == list(range(n_ads))
    finally:
        index.close()


def test_ads_with_identical_vectors_do_not_cap_the_measured_recall(tmp_path: Path) -> None:
    """Issue 11 item 2, on TalkingData: 148 apps, 107 distinct vectors (cold apps share their
    features' vector), measured recall@100 0.895 < 0.9 even at an exhaustive search_k. Which of
    two identical ads the exact search lists is arbitrary; either is a correct answer."""
    base = two_tower_like(n_ads=30, n_users=50, n_placements=2, dim=DIM, clusters=4, seed=5)
    ids, vectors = base.tables["ads"]
    twins = np.array([f"{ad}-twin" for ad in ids])
    twice = {**base.tables, "ads": (np.concatenate([ids, twins]), np.concatenate([vectors] * 2))}
    emb = publish_embeddings(tmp_path / "embeddings", VERSION, twice, base.fallbacks)
    exhaustive = 50 * 60  # every item of every tree: the search is exact
    folder = build_index(
        emb, tmp_path / "index", metric="angular", n_trees=50, recall_k=25, search_k=exhaustive
    )
    manifest = read_manifest(folder)
    assert manifest["counts"]["ads"] == 60 and manifest["ann_recall_at_k"] == 1.0
