"""The towers and the ranker split the training window so that the ranker's two-tower inputs
never saw the ranker's own clicks."""

from __future__ import annotations

import pytest

from pipelines.training_days import split_training_days

WEEK = tuple(f"2024-01-0{d}" for d in range(1, 8))


def test_with_scores_the_towers_leave_out_the_rankers_days() -> None:
    days = split_training_days(WEEK, similarity=True, ranker_days=2)
    assert days.similarity
    assert days.towers == WEEK[:5] and days.ranker == WEEK[5:]
    assert not set(days.towers) & set(days.ranker)


def test_without_scores_both_learn_from_every_day() -> None:
    days = split_training_days(list(reversed(WEEK)), similarity=False, ranker_days=2)
    assert days.towers == days.ranker == WEEK
    assert not days.similarity


@pytest.mark.parametrize(
    ("window", "towers", "ranker"),
    [(WEEK[:3], WEEK[:1], WEEK[1:3]), (WEEK[:2], WEEK[:1], WEEK[1:2])],
)
def test_a_short_window_gives_the_ranker_fewer_days(window, towers, ranker) -> None:
    days = split_training_days(window, similarity=True, ranker_days=3)
    assert (days.towers, days.ranker, days.similarity) == (towers, ranker, True)


def test_one_day_leaves_the_ranker_without_scores() -> None:
    days = split_training_days(WEEK[:1], similarity=True, ranker_days=2)
    assert not days.similarity
    assert days.towers == days.ranker == WEEK[:1]
    assert "no two-tower scores" in days.why


def test_refit_serves_towers_of_the_whole_window_and_keeps_the_rankers_inputs_apart() -> None:
    days = split_training_days(WEEK, similarity=True, ranker_days=2, refit=True)
    assert days.refit
    assert days.towers == WEEK[:5] and days.ranker == WEEK[5:]  # the ranker's inputs: no leak
    assert days.served == WEEK
    assert days.describe()["served_towers"] == list(WEEK)


@pytest.mark.parametrize(
    ("window", "similarity", "refit"),
    [(WEEK, True, False), (WEEK, False, True), (WEEK[:1], True, True)],
)
def test_one_towers_model_when_nothing_asks_for_a_refit(window, similarity, refit) -> None:
    """Without refit, without the scores (the towers already learn from every day) or with a
    single day, the served towers are the only towers."""
    days = split_training_days(window, similarity=similarity, ranker_days=2, refit=refit)
    assert not days.refit
    assert days.served == days.towers
