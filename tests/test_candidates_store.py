"""Embedding tables (contracts §4): round trip, binary-search lookup, and refusal of bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candidates.store import (
    EmbeddingStoreError,
    publish_embeddings,
    read_embeddings,
    read_table,
    write_table,
)
from deepclick.publish import IntegrityError, current_version

DIM = 4


def small_tables() -> tuple[dict[str, tuple[list[str], np.ndarray]], dict[str, np.ndarray]]:
    """Ids deliberately unsorted (and with a multi-byte character) so the writer must sort."""
    ads = ["ad10", "ad2", "ad1", "écran", "ad100"]
    users = ["u3", "u1", "u2"]
    placements = ["home", "cart"]
    tables = {
        "ads": (ads, np.arange(len(ads) * DIM, dtype=np.float32).reshape(-1, DIM)),
        "users": (users, np.arange(len(users) * DIM, dtype=np.float32).reshape(-1, DIM) + 100),
        "placements": (placements, np.full((2, DIM), [[1], [2]], dtype=np.float32)),
    }
    fallbacks = {"user": np.full(DIM, 0.5, np.float32), "placement": np.zeros(DIM, np.float32)}
    return tables, fallbacks


def test_round_trip_sorts_ids_and_keeps_each_vector_with_its_id(tmp_path: Path) -> None:
    tables, fallbacks = small_tables()
    folder = publish_embeddings(tmp_path / "emb", "20240105", tables, fallbacks, inputs={"x": 1})

    emb = read_embeddings(folder)

    assert current_version(tmp_path / "emb") == "20240105"
    assert emb.version == "20240105" and emb.dim == DIM
    assert emb.manifest["counts"] == {"users": 3, "placements": 2, "ads": 5}
    assert emb.manifest["metric"] == "dot" and emb.manifest["inputs"] == {"x": 1}
    assert [emb.ads.id_at(i) for i in range(5)] == sorted(
        ["ad10", "ad2", "ad1", "écran", "ad100"], key=lambda s: s.encode()
    )
    for table_name, (ids, vectors) in tables.items():
        table = getattr(emb, table_name)
        assert isinstance(table.ids, np.memmap) and isinstance(table.vectors, np.memmap)
        for entity_id, vector in zip(ids, vectors, strict=True):
            np.testing.assert_array_equal(table.vector(entity_id), vector)
    np.testing.assert_array_equal(emb.fallback_user, np.full(DIM, 0.5))


def test_lookup_finds_present_ids_and_misses_absent_ones(tmp_path: Path) -> None:
    ids = [f"ad{i}" for i in range(0, 2000, 2)]  # even numbers only: odd ones are planted gaps
    write_table(tmp_path, "ads", ids, np.zeros((len(ids), 2), np.float32))
    table = read_table(tmp_path, "ads")

    for entity_id in ("ad0", "ad2", "ad998", "ad1998", "ad1000"):
        row = table.row(entity_id)
        assert row is not None and table.id_at(row) == entity_id
    absent = ["ad1", "ad999", "ad1999", "ad", "a", "", "ad20000000000", "ad2\x00", "zz", "AD2"]
    assert [table.row(entity_id) for entity_id in absent] == [None] * len(absent)


def test_empty_table_has_no_rows(tmp_path: Path) -> None:
    write_table(tmp_path, "placements", [], np.zeros((0, 3), np.float32))
    table = read_table(tmp_path, "placements")
    assert len(table) == 0 and table.row("anything") is None


def test_duplicate_ids_and_misaligned_vectors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingStoreError, match="ads: duplicate id 'ad1'"):
        write_table(tmp_path, "ads", ["ad1", "ad2", "ad1"], np.zeros((3, 2)))
    with pytest.raises(EmbeddingStoreError, match="one row per id"):
        write_table(tmp_path, "ads", ["ad1", "ad2"], np.zeros((3, 2)))
    with pytest.raises(EmbeddingStoreError, match="empty or contains NUL"):
        write_table(tmp_path, "ads", ["ad1", ""], np.zeros((2, 2)))


def test_unsorted_id_file_is_refused_because_binary_search_would_miss(tmp_path: Path) -> None:
    np.save(tmp_path / "ads_ids.npy", np.array([b"b", b"a"]))
    np.save(tmp_path / "ads_vectors.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(EmbeddingStoreError, match=r"ads_ids.npy: ids must be sorted and unique"):
        read_table(tmp_path, "ads")


def test_vector_rows_must_match_ids(tmp_path: Path) -> None:
    np.save(tmp_path / "ads_ids.npy", np.array([b"a", b"b"]))
    np.save(tmp_path / "ads_vectors.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(EmbeddingStoreError, match=r"has 3 rows but ads_ids.npy has 2 ids"):
        read_table(tmp_path, "ads")


def test_altered_vectors_fail_checksum_verification(tmp_path: Path) -> None:
    tables, fallbacks = small_tables()
    folder = publish_embeddings(tmp_path, "20240105", tables, fallbacks)
    np.save(folder / "users_vectors.npy", np.ones((3, DIM), np.float32))
    with pytest.raises(IntegrityError, match=r"altered: users_vectors.npy"):
        read_embeddings(folder)


def test_tables_must_share_one_dimension(tmp_path: Path) -> None:
    tables, fallbacks = small_tables()
    tables["users"] = (["u1"], np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(EmbeddingStoreError, match="one dim"):
        publish_embeddings(tmp_path, "20240105", tables, fallbacks)
    assert not (tmp_path / "20240105").exists()
