"""Popular ads (contracts §5 popular.json): ranking from click counts and the file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from candidates.popular import (
    GLOBAL,
    PopularAds,
    PopularFileError,
    rank_popular,
    read_popular,
    write_popular,
)

ROWS = [
    ("home", "a", 5),
    ("home", "b", 9),
    ("home", "c", 5),  # ties with "a": broken by id
    ("home", "z", 0),  # never clicked: not popular
    ("cart", "b", 1),
    ("cart", "d", 4),
    ("cart", "d", 3),  # repeated rows add up
]


def test_ranks_by_clicks_with_ties_broken_by_id() -> None:
    popular = rank_popular(ROWS, top_n=3)
    assert popular.by_placement == {"home": ("b", "a", "c"), "cart": ("d", "b")}
    # no __all__ rows: the overall list sums placements (b: 10, d: 7, a: 5, c: 5)
    assert popular.global_ads == ("b", "d", "a")


def test_overall_rows_win_over_the_sum_and_keep_filters_unservable_ads() -> None:
    rows = [*ROWS, (GLOBAL, "c", 100), (GLOBAL, "gone", 50), (GLOBAL, "a", 1)]
    popular = rank_popular(rows, top_n=10, keep=lambda ad: ad != "gone")
    assert popular.global_ads == ("c", "a")
    assert "gone" not in popular.for_placement("home")


def test_placement_without_its_own_list_gets_the_overall_list() -> None:
    popular = PopularAds(("g1", "g2"), {"home": ("h1",), "empty": ()})
    assert popular.for_placement("home") == ("h1",)
    assert popular.for_placement("new-placement") == ("g1", "g2")
    assert popular.for_placement("empty") == ("g1", "g2")
    assert popular.for_placement(None) == ("g1", "g2")


def test_file_round_trip_and_malformed_file(tmp_path: Path) -> None:
    popular = rank_popular(ROWS, top_n=2)
    write_popular(tmp_path / "popular.json", popular)
    assert read_popular(tmp_path / "popular.json") == popular

    (tmp_path / "bad.json").write_text('{"global": "b"}')
    with pytest.raises(PopularFileError, match=r"bad.json must be \{\"global\": \[ad ids\]"):
        read_popular(tmp_path / "bad.json")
