"""The gate's decision as a pure function (issue 13, item 1): every branch on planted numbers.

``decide`` gets the evidence the gate stage gathered — D's challenger summary, the champion's
decision record and its numbers on D — and answers without files or MLflow; the end-to-end
stories in ``test_daily.py`` only check that the stage wires it.
"""

from __future__ import annotations

import datetime as dt

import pytest

from deepclick.settings import LifecycleSettings
from lifecycle.gate import (
    EARLIER_CHAMPION,
    LATER_CHAMPION,
    NO_CHAMPION,
    SAME_DAY,
    champion_basis,
    decide,
    recorded_champion_metrics,
)

D = dt.date(2024, 1, 5)
GATES = LifecycleSettings(
    gate_min_auc=0.6,
    gate_auc_tolerance=0.01,
    gate_calibration_min=0.9,
    gate_calibration_max=1.1,
    recall_ks=[100],
    gate_recall_k=100,
    gate_recall_tolerance=0.02,
    gate_min_recall=0.1,
)
GOOD = {"auc": 0.70, "calibration_ratio": 1.02, "recall_at_100": 0.40}


def champion_of(day: str, metrics: dict[str, float] | None = None) -> dict[str, object]:
    """A decision record as ``registry.current_champion`` returns it."""
    return {"id": "c1", "date": day, "metrics": {"challenger": metrics or {}, "champion": None}}


@pytest.mark.parametrize(
    ("champion", "basis"),
    [
        (None, NO_CHAMPION),
        (champion_of("2024-01-06"), LATER_CHAMPION),
        (champion_of("2024-01-05"), SAME_DAY),
        (champion_of("2024-01-04"), EARLIER_CHAMPION),
    ],
)
def test_champion_basis_follows_the_day_the_champion_was_built_for(champion, basis):
    assert champion_basis(champion, D) == basis


def test_no_champion_promotes_a_challenger_that_passes_the_absolute_bounds():
    result = decide(D, GOOD, None, None, GATES)
    assert result.promote and result.verdict == "promote"
    assert not result.compared_with_champion
    assert {c.name for c in result.checks} == {"auc", "recall_at_100", "calibration_ratio"}


def test_no_champion_refuses_a_challenger_below_the_auc_floor():
    result = decide(D, {**GOOD, "auc": 0.55}, None, None, GATES)
    assert not result.promote and result.verdict == "refuse"
    assert [c.name for c in result.checks if not c.passed] == ["auc"]


def test_no_champion_promotes_on_insufficient_evidence_because_nothing_else_would_serve():
    """An AUC interval across the floor is undecided; with no champion the first model serves."""
    challenger = {**GOOD, "auc": 0.61, "auc_ci_low": 0.55, "auc_ci_high": 0.67}
    result = decide(D, challenger, None, None, GATES)
    assert result.verdict == "insufficient_evidence" and result.promote


def test_champion_built_after_d_is_never_replaced_by_a_model_of_d():
    """Backfilling an older day while a newer champion serves refuses, without measuring it."""
    later = champion_of("2024-01-07")
    result = decide(D, {**GOOD, "auc": 0.99}, later, None, GATES)
    assert not result.promote and result.compared_with_champion
    (check,) = result.checks
    assert check.name == "champion_date" and not check.passed
    assert "2024-01-07" in check.rule and "2024-01-05" in check.rule


def test_same_day_champion_is_compared_on_its_recorded_numbers():
    recorded = {**GOOD, "auc": 0.75}
    champion = champion_of("2024-01-05", recorded)
    assert recorded_champion_metrics(champion) == recorded
    result = decide(D, GOOD, champion, recorded_champion_metrics(champion), GATES)
    # 0.70 < 0.75 − 0.01: worse than the champion beyond the tolerance.
    assert not result.promote and result.verdict == "refuse"
    assert [c.name for c in result.checks if not c.passed] == ["auc_vs_champion"]


def test_earlier_champion_within_tolerance_on_d_is_replaced():
    measured = {**GOOD, "auc": 0.705, "recall_at_100": 0.41}  # −0.005 AUC, −0.01 recall: tolerated
    result = decide(D, GOOD, champion_of("2024-01-03"), measured, GATES)
    assert result.promote and result.verdict == "promote" and result.compared_with_champion
    assert {c.name for c in result.checks} >= {"auc_vs_champion", "recall_at_100_vs_champion"}


def test_earlier_champion_whose_interval_straddles_the_tolerance_keeps_serving():
    challenger = {**GOOD, "auc_ci_low": 0.66, "auc_ci_high": 0.74}
    measured = {**GOOD, "auc": 0.71, "auc_ci_low": 0.67, "auc_ci_high": 0.75}
    result = decide(D, challenger, champion_of("2024-01-03"), measured, GATES)
    assert result.verdict == "insufficient_evidence" and not result.promote


def test_a_paired_interval_on_the_same_rows_decides_what_two_separate_intervals_cannot():
    """The demo's day 2024-01-04: the challenger's AUC +0.025 over the champion's on the same
    rows; each model's own interval is ±0.03, so taken as independent they hold both sides of
    the tolerance, while the paired bootstrap of the difference (the two models err on the same
    rows together) lies above it. The paired interval is what the gate judges."""
    challenger = {**GOOD, "auc": 0.6926, "auc_ci_low": 0.6626, "auc_ci_high": 0.7226}
    measured = {**GOOD, "auc": 0.6678, "auc_ci_low": 0.6378, "auc_ci_high": 0.6978}
    unpaired = decide(D, challenger, champion_of("2024-01-03"), measured, GATES)
    assert unpaired.verdict == "insufficient_evidence" and not unpaired.promote
    paired = {"auc_paired_difference_ci_low": 0.012, "auc_paired_difference_ci_high": 0.037}
    result = decide(D, challenger, champion_of("2024-01-03"), {**measured, **paired}, GATES)
    assert result.promote and result.verdict == "promote"
    (check,) = [c for c in result.checks if c.name == "auc_vs_champion"]
    assert "95% CI 0.6798–0.7048" in check.rule  # the champion's 0.6678 + the paired interval
    worse = {"auc_paired_difference_ci_low": -0.040, "auc_paired_difference_ci_high": -0.015}
    refused = decide(D, challenger, champion_of("2024-01-03"), {**measured, **worse}, GATES)
    assert refused.verdict == "refuse" and not refused.promote


def test_champion_to_compare_without_its_numbers_is_a_clear_error():
    with pytest.raises(ValueError, match="no champion metrics on 2024-01-05"):
        decide(D, GOOD, champion_of("2024-01-03"), None, GATES)


def test_the_gate_stage_pairs_the_two_evaluations_row_by_row(tmp_path):
    """``paired_differences`` reads the challenger's and the champion's per-row predictions of
    D: a challenger that ranks every click above every non-click against a champion at chance
    differs by +0.5 with a tight interval; files of other rows give no paired interval (the gate
    falls back to the two separate ones), as does a run without resamples."""
    import numpy as np
    import pandas as pd

    from lifecycle.stages import paired_differences
    from models.evaluation.ranking import auc
    from models.evaluation.report import PREDICTIONS_FILE

    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.1).astype(int)
    perfect = labels * 0.5 + rng.random(2000) * 0.1
    chance = rng.random(2000)
    for name, scores in (("mine", perfect), ("theirs", chance), ("other", chance[:1000])):
        (tmp_path / name / "ranking").mkdir(parents=True)
        frame = pd.DataFrame({"label": labels[: len(scores)], "ranker": scores})
        frame.to_parquet(tmp_path / name / "ranking" / PREDICTIONS_FILE)
    found = paired_differences(tmp_path / "mine", tmp_path / "theirs", samples=50, recall_ks=[100])
    assert found["auc_paired_difference"] == pytest.approx(1.0 - auc(labels, chance))
    assert 0.4 < found["auc_paired_difference_ci_low"] <= found["auc_paired_difference"]
    assert found["auc_paired_difference"] <= found["auc_paired_difference_ci_high"] < 0.6
    assert "recall_at_100_paired_difference" not in found  # no per-click recall files here
    assert paired_differences(tmp_path / "mine", tmp_path / "other", samples=50, recall_ks=[]) == {}
    assert paired_differences(tmp_path / "mine", tmp_path / "theirs", samples=0, recall_ks=[]) == {}


def test_recall_against_the_champion_is_judged_click_by_click(tmp_path):
    """On the same 1,000 sampled clicks the challenger finds 190 at K = 100 and the champion 199.
    Two Wilson intervals taken as independent (about ±0.025 each) straddle the champion − 0.02
    tolerance: insufficient evidence. But the challenger's finds are a subset of the champion's,
    so only 9 clicks disagree: the paired interval of the difference is −0.009 ± ~0.006, inside
    the tolerance, and the gate decides. A challenger that finds 224 where the champion's 199
    are a subset gets a paired interval above zero."""
    import numpy as np
    import pandas as pd

    from lifecycle.stages import RECALL_HITS_FILE, paired_differences
    from models.evaluation.ranking import proportion_interval

    clicks = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(1000)],
            "placement_id": "p1",
            "ad_id": [f"a{i % 37}" for i in range(1000)],
        }
    )
    for name, found in (("better", 224), ("theirs", 199), ("worse", 190)):
        (tmp_path / name).mkdir()
        hits = (np.arange(1000) < found).astype(float)
        clicks.assign(recall_at_100=hits).to_parquet(tmp_path / name / RECALL_HITS_FILE)
    paired = paired_differences(
        tmp_path / "better", tmp_path / "theirs", samples=200, recall_ks=[100]
    )
    assert paired["recall_at_100_paired_difference"] == pytest.approx(0.025)
    assert 0.0 < paired["recall_at_100_paired_difference_ci_low"] < 0.025
    assert 0.025 < paired["recall_at_100_paired_difference_ci_high"] < 0.04

    def summary(found: int) -> dict[str, float]:
        low, high = proportion_interval(found, 1000)
        return {**GOOD, "recall_at_100": found / 1000, "recall_at_100_ci_low": low,
                "recall_at_100_ci_high": high}  # fmt: skip

    worse, measured = summary(190), summary(199)
    unpaired = decide(D, worse, champion_of("2024-01-03"), measured, GATES)
    assert unpaired.verdict == "insufficient_evidence" and not unpaired.promote
    paired = paired_differences(
        tmp_path / "worse", tmp_path / "theirs", samples=200, recall_ks=[100]
    )
    result = decide(D, worse, champion_of("2024-01-03"), {**measured, **paired}, GATES)
    check = next(c for c in result.checks if c.name == "recall_at_100_vs_champion")
    assert check.passed and not check.undecided, check.rule
    # Clicks of another sample cannot be paired: the gate falls back to the separate intervals.
    clicks.assign(user_id="someone", recall_at_100=0.0).to_parquet(
        tmp_path / "theirs" / RECALL_HITS_FILE
    )
    assert (
        paired_differences(tmp_path / "worse", tmp_path / "theirs", samples=200, recall_ks=[100])
        == {}
    )
