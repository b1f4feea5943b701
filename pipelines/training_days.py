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

With ``refit`` the towers are trained a second time, on the whole window, and those are the ones
served (embeddings, index, and the scores the ranker reads online and on D): the ranker's own
training inputs still come from the towers that never saw its days. A score from towers that saw
two more days is the same kind of score, a little better informed (generated medium world, README
"Models": funnel recall@500 1.00x -> 1.06x popularity, AUC and calibration on D level), but not
always on the same scale: on TalkingData they spread 4-5x wider than the one-day towers' scores
the ranker standardised in training, and read raw they made it over-predict D (calibration 1.13 ->
1.38). The ranker stage therefore exports the ranker reading them on its trained scale
(``models.ranker.train.on_served_scores``). An option, off by default: at 10M it moved the
funnel little and calibration away from 1 (1.001 -> 0.983).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingDays:
    """The days of the towers and of the ranker, whether the ranker takes the scores, and the
    days of the towers that are served."""

    towers: tuple[str, ...]
    """Days of the towers whose scores the ranker trains on."""
    ranker: tuple[str, ...]
    similarity: bool
    why: str
    served: tuple[str, ...] = ()
    """Days of the served towers; empty: the same as ``towers``."""

    def __post_init__(self) -> None:
        if not self.served:
            object.__setattr__(self, "served", self.towers)

    @property
    def refit(self) -> bool:
        """The served towers are a second fit, on other days than the ranker's inputs."""
        return self.served != self.towers

    def describe(self) -> dict[str, object]:
        return {
            "towers": list(self.towers),
            "ranker": list(self.ranker),
            "similarity": self.similarity,
            "served_towers": list(self.served),
            "why": self.why,
        }


def split_training_days(
    train_dates: Sequence[str], similarity: bool, ranker_days: int, refit: bool = False
) -> TrainingDays:
    """Split the window's days between the towers and the ranker.

    Args:
        train_dates: the training days of the features folder (``FeatureSpec.train_dates``).
        similarity: the ranker should take the two-tower scores as inputs.
        ranker_days: days at the end of the window kept for the ranker (from the towers).
        refit: with the scores, serve towers trained again on the whole window.

    Returns:
        Without ``similarity`` both models learn from every day. With it, the towers learn from
        all but the last ``ranker_days`` days and the ranker from those; when the window is too
        short for that, fewer days go to the ranker, and with a single day the ranker does
        without the scores (the towers then keep the day). With ``refit`` and the scores, the
        served towers learn from every day.
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
    why = f"towers on the first {len(days) - kept} day(s), ranker on the last {kept}"
    if refit:
        why += f"; the served towers refitted on all {len(days)}"
    return TrainingDays(days[:-kept], days[-kept:], True, why, served=days if refit else ())
