"""Which training days each model learns from, so that the ranker's two-tower inputs never saw
the clicks the ranker learns from.

The ranker can take the two-tower scores ``user·ad`` and ``context·ad`` as inputs. Were the towers
trained on the same clicked impressions, those scores would carry the labels of the ranker's own
rows: the network learns to trust them, its held-out day (inside the towers' window too) confirms
it, and on the real evaluation day, which the towers never saw, it is worse and mis-calibrated
(measured at 10M impressions: held-out AUC 0.94, evaluation-day AUC 0.71, calibration 0.65). So
the towers train on the window minus its last ``ranker_days`` days, and the ranker trains (and
calibrates, on the last of them) on those days only — the same relation the scores have to day D
when serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingDays:
    """The days of the towers and of the ranker, and whether the ranker takes the scores."""

    towers: tuple[str, ...]
    ranker: tuple[str, ...]
    similarity: bool
    why: str

    def describe(self) -> dict[str, object]:
        return {
            "towers": list(self.towers),
            "ranker": list(self.ranker),
            "similarity": self.similarity,
            "why": self.why,
        }


def split_training_days(
    train_dates: Sequence[str], similarity: bool, ranker_days: int
) -> TrainingDays:
    """Split the window's days between the towers and the ranker.

    Args:
        train_dates: the training days of the features folder (``FeatureSpec.train_dates``).
        similarity: the ranker should take the two-tower scores as inputs.
        ranker_days: days at the end of the window kept for the ranker (from the towers).

    Returns:
        Without ``similarity`` both models learn from every day. With it, the towers learn from
        all but the last ``ranker_days`` days and the ranker from those; when the window is too
        short for that, fewer days go to the ranker, and with a single day the ranker does
        without the scores (the towers then keep the day).
    """
    days = tuple(sorted(train_dates))
    if not similarity:
        return TrainingDays(days, days, False, "the ranker takes no two-tower scores")
    if len(days) < 2:
        return TrainingDays(
            days,
            days,
            False,
            "one training day: no day is left for the ranker that the towers did not see, so "
            "the ranker takes no two-tower scores",
        )
    kept = min(ranker_days, len(days) - 1)
    return TrainingDays(
        days[:-kept],
        days[-kept:],
        True,
        f"towers on the first {len(days) - kept} day(s), ranker on the last {kept}",
    )
