"""Retrieval metrics against hand-computed values on tiny inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepclick.topk import ann_recall, exact_top_k, top_rows
from models.evaluation.ranking import paired_mean_difference
from models.evaluation.retrieval import plot_recall_at_k, recall_at_k, recall_per_query


class TestRecallAtK:
    def test_one_click_per_query(self) -> None:
        ranked = np.array([["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"]])
        relevant = np.array(["b", "b", "q"])
        # b is at position 2 for query 0, position 3 for query 1, absent for query 2.
        assert recall_at_k(ranked, relevant, [1, 2, 3]) == pytest.approx(
            {1: 0.0, 2: 1 / 3, 3: 2 / 3}
        )

    def test_several_relevant_items_count_as_a_share(self) -> None:
        assert recall_at_k([[1, 2, 3, 4]], [{2, 4}], [1, 2, 4]) == pytest.approx(
            {1: 0.0, 2: 0.5, 4: 1.0}
        )

    def test_ragged_lists_and_k_beyond_the_list(self) -> None:
        # Query 0 has one candidate only; asking for K=5 just gives it fewer chances.
        assert recall_at_k([[1], [2, 3]], np.array([3, 3]), [1, 2, 5]) == pytest.approx(
            {1: 0.0, 2: 0.5, 5: 0.5}
        )

    def test_duplicates_in_a_list_are_not_counted_twice(self) -> None:
        assert recall_at_k([["a", "a", "b"]], [["a", "b"]], [2, 3]) == pytest.approx(
            {2: 0.5, 3: 1.0}
        )

    def test_queries_without_relevant_items_are_left_out(self) -> None:
        assert recall_at_k([[1, 2], [1, 2]], [[1], []], [1]) == {1: 1.0}

    def test_per_query_recall_is_what_the_mean_averages(self) -> None:
        """Query by query (NaN where a query has no relevant id), for paired comparisons."""
        per_query = recall_per_query([[1, 2], [3, 1], [1, 2]], [[2], [], [2, 3]], [1, 2])
        np.testing.assert_array_equal(per_query[1], [0.0, np.nan, 0.0])
        np.testing.assert_array_equal(per_query[2], [1.0, np.nan, 0.5])
        assert recall_at_k([[1, 2], [3, 1], [1, 2]], [[2], [], [2, 3]], [2]) == {2: 0.75}

    def test_paired_difference_rests_on_the_units_that_disagree(self) -> None:
        """Identical hit lists differ by exactly 0 with a zero-width interval; one discordant
        unit in 100 moves the mean by 0.01, and the interval stays within [0, 0.03]."""
        same = np.r_[np.ones(30), np.zeros(70)]
        assert paired_mean_difference(same, same, samples=100) == (0.0, 0.0, 0.0)
        one_more = same.copy()
        one_more[50] = 1.0
        difference, low, high = paired_mean_difference(one_more, same, samples=200)
        assert difference == pytest.approx(0.01) and 0.0 <= low <= difference <= high <= 0.03
        with pytest.raises(ValueError, match="equal-length"):
            paired_mean_difference(same, same[:10])

    def test_bad_inputs_say_what_is_wrong(self) -> None:
        with pytest.raises(ValueError, match="one entry per query"):
            recall_at_k([[1, 2]], np.array([1, 2]), [1])
        with pytest.raises(ValueError, match="K >= 1"):
            recall_at_k([[1, 2]], np.array([1]), [0])


def test_ann_recall_is_the_share_of_the_exact_top_k_found() -> None:
    approx = [[1, 2, 3], [4, 5, 6]]
    exact = np.array([[1, 2, 9], [4, 7, 8]])
    assert ann_recall(approx, exact) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert ann_recall(approx, exact, k=1) == pytest.approx(1.0)


def test_ann_recall_counts_an_item_tied_with_the_kth_exact_one() -> None:
    # Issue 13: one ANN recall for the index build and the evaluations. Rows 1 and 2 are the same
    # vector, so an answer holding row 2 where exact search picked row 1 is just as good.
    items = np.array([[1.0, 0.0], [0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0]])
    exact = exact_top_k(queries, items, 2)
    assert exact.tolist() == [[0, 1]]
    assert ann_recall([[0, 2]], exact) == pytest.approx(0.5)
    assert ann_recall([[0, 2]], exact, items=items, queries=queries) == pytest.approx(1.0)
    assert ann_recall([[0, 3]], exact, items=items, queries=queries) == pytest.approx(0.5)
    assert ann_recall([], []) == 1.0


def test_exact_top_k_is_best_first_with_ties_to_the_lower_row() -> None:
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = np.array([[1.0, 0.0], [0.0, 2.0]])
    # scores: [1, 0, 1] and [0, 2, 2]
    assert exact_top_k(queries, items, 3).tolist() == [[0, 2, 1], [1, 2, 0]]
    assert exact_top_k(queries, items, 10).shape == (2, 3)


def test_plot_recall_at_k_writes_a_png(tmp_path: Path) -> None:
    path = plot_recall_at_k(
        {"two_tower": {10: 0.3, 100: 0.6, 500: 0.9}, "popularity": {10: 0.1, 100: 0.2, 500: 0.4}},
        tmp_path / "plots" / "recall.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_top_k_agrees_with_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    items, queries = rng.normal(size=(300, 8)), rng.normal(size=(40, 8))
    full = np.argsort(-(queries @ items.T), axis=1)[:, :25]
    assert (exact_top_k(queries, items, 25) == full).all()


@pytest.mark.parametrize("n", [1, 50, 500, 1000, 5000, 100_000])
def test_top_rows_is_a_full_sort_best_first_with_ties_to_the_lower_row(n: int) -> None:
    """The candidate stage's exact search (issue 14: a sampled threshold first on large
    arrays): the same rows as a stable full sort, ties included — planted ties straddle the
    n-th place, and whole blocks of equal scores."""
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(100_000).astype(np.float32)
    scores[rng.choice(100_000, 3000, replace=False)] = np.sort(scores)[-n]  # ties at the n-th
    want = np.argsort(-scores, kind="stable")[:n]
    np.testing.assert_array_equal(top_rows(scores, n), want)
    blocks = np.repeat(np.arange(1000, dtype=np.float32), 100)  # 100 equal scores per value
    np.testing.assert_array_equal(top_rows(blocks, n), np.argsort(-blocks, kind="stable")[:n])
