"""The gate (DESIGN.md, "MLflow … gates"): whether D's challenger may replace the champion.

Pure functions only — no files, no MLflow — so every branch is a unit test on planted numbers
(``tests/test_gate.py``). The daily run's gate stage (``lifecycle/stages.py``) gathers the
evidence (the challenger's evaluation summary, the champion from the decisions ledger and, when
the champion was built for an earlier day, its numbers re-measured on D) and hands it to
:func:`decide`; the registry (``lifecycle/registry.py``) records what was decided.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from deepclick.settings import LifecycleSettings


def recall_metric(k: int) -> str:
    """The name of recall@K in evaluation summaries (MLflow keys may not hold ``@``)."""
    return f"recall_at_{k}"


# --------------------------------------------------------------------------- gates (pure)


PROMOTE = "promote"
REFUSE = "refuse"
INSUFFICIENT = "insufficient_evidence"
Verdict = Literal["promote", "refuse", "insufficient_evidence"]


@dataclass(frozen=True)
class Check:
    """One gate: the rule, the value it judged and the bound it was held to. ``undecided``: the
    day's evidence cannot tell (the interval straddles the bound) — neither a pass nor a fail."""

    name: str
    passed: bool
    value: float | None
    bound: float | None
    rule: str
    undecided: bool = False


@dataclass(frozen=True)
class GateResult:
    """Whether a challenger may become champion, and every check that decided it.

    The verdict has three values (issue 10, item 5): ``refuse`` when a check failed beyond its
    uncertainty; ``insufficient_evidence`` when none failed but at least one could not be decided
    on this day's clicks — the champion keeps serving (with no champion, nothing would serve, so
    the first model is promoted and the record says on how little evidence); ``promote``.
    """

    promote: bool
    checks: tuple[Check, ...]
    compared_with_champion: bool

    @property
    def verdict(self) -> Verdict:
        if any(not c.passed and not c.undecided for c in self.checks):
            return REFUSE
        if any(c.undecided for c in self.checks):
            return INSUFFICIENT
        return PROMOTE

    @property
    def reason(self) -> str:
        failed = [c.rule for c in self.checks if not c.passed and not c.undecided]
        if failed:
            return "refused: " + "; ".join(failed)
        undecided = [c.rule for c in self.checks if c.undecided]
        if undecided:
            action = (
                "keep the champion"
                if self.compared_with_champion
                else "promoted, as no champion serves"
            )
            return f"insufficient evidence: {action} ({'; '.join(undecided)})"
        against = "the champion" if self.compared_with_champion else "the absolute bounds"
        return f"passed every gate against {against}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "verdict": self.verdict,
            "reason": self.reason,
            "compared_with_champion": self.compared_with_champion,
            "checks": [asdict(c) for c in self.checks],
        }


def _value(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    if metrics is None:
        return None
    value = metrics.get(key)
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value)
    return None


def _interval(metrics: Mapping[str, Any] | None, key: str) -> tuple[float, float] | None:
    """``<key>_ci_low`` / ``<key>_ci_high`` of an evaluation summary, when both are there."""
    low, high = _value(metrics, f"{key}_ci_low"), _value(metrics, f"{key}_ci_high")
    return None if low is None or high is None else (low, high)


def at_least(
    name: str,
    value: float | None,
    bound: float,
    rule: str,
    interval: tuple[float, float] | None = None,
) -> Check:
    """``value ≥ bound``, judged on ``interval`` when there is one: its low end above the bound
    passes, its high end below fails, an interval across the bound is undecided."""
    if value is None:
        return Check(name, False, None, bound, f"{name} is missing from the evaluation")
    if interval is None:
        passed = value >= bound
        detail = f"{name} {value:.4f} {'≥' if passed else '<'} {bound:.4f} ({rule})"
        return Check(name, passed, value, bound, detail)
    low, high = interval
    span = f"95% CI {low:.4f}–{high:.4f}"
    if low >= bound:
        return Check(name, True, value, bound, f"{name} {value:.4f} ≥ {bound:.4f}, {span} ({rule})")
    if high < bound:
        return Check(
            name,
            False,
            value,
            bound,
            f"{name} {value:.4f} < {bound:.4f} beyond its {span} ({rule})",
        )
    return Check(
        name,
        False,
        value,
        bound,
        f"{name} {value:.4f} vs {bound:.4f}: its {span} holds both sides ({rule})",
        undecided=True,
    )


PAIRED = "paired_difference"
"""``<key>_paired_difference_ci_low`` / ``_ci_high`` in the champion's summary: the interval of
challenger − champion bootstrapped on the same rows of D (both models scored on each resample)."""


def _difference_interval(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], key: str
) -> tuple[float, float] | None:
    """Interval of challenger − champion: the paired one when the champion's summary carries it
    (:data:`PAIRED`), else from the two summaries' intervals taken as independent (a
    conservative width: the two were measured on the same rows, which only narrows it)."""
    paired = _interval(champion, f"{key}_{PAIRED}")
    if paired is not None:
        return paired
    mine, theirs = _interval(challenger, key), _interval(champion, key)
    a, b = _value(challenger, key), _value(champion, key)
    if mine is None or theirs is None or a is None or b is None:
        return None
    half = math.hypot((mine[1] - mine[0]) / 2.0, (theirs[1] - theirs[0]) / 2.0)
    return (a - b - half, a - b + half)


def judge(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    gates: LifecycleSettings,
) -> GateResult:
    """Apply the gates to a challenger's evaluation summary (and the champion's on the same day).

    Every figure carries its uncertainty when the summary has it (``<metric>_ci_low`` /
    ``_ci_high``); without it the point value is judged, as before.

    - AUC ≥ ``gate_min_auc`` and recall@K ≥ ``gate_min_recall`` (absolute floors);
    - calibration: the interval of the ratio (from the interval of D's click count) must reach
      ``[gate_calibration_min, gate_calibration_max]`` — refused only when the miscalibration is
      beyond what the day's clicks can tell;
    - peers (``gate_peers``): refused when the ranker's AUC is below the best peer's (one-hot LR,
      GBDT, ad CTR prior, scored on the same rows) beyond the paired interval of the difference;
    - with a champion: the challenger may lose at most ``gate_auc_tolerance`` AUC and
      ``gate_recall_tolerance`` recall@K — judged on the interval of the difference (paired on
      D's rows when the champion's summary has it, :data:`PAIRED`), so an interval wider than
      the tolerance is insufficient evidence, not a pass or a refusal;
    - fewer than ``gate_min_clicks`` clicks on D: insufficient evidence, whatever the numbers.
    """
    recall = recall_metric(gates.gate_recall_k)
    auc = _value(challenger, "auc")
    checks = [
        at_least("auc", auc, gates.gate_min_auc, "absolute floor", _interval(challenger, "auc")),
        at_least(
            recall,
            _value(challenger, recall),
            gates.gate_min_recall,
            "absolute floor",
            _interval(challenger, recall),
        ),
        _calibration(challenger, gates),
    ]
    clicks = _value(challenger, "eval_clicks")
    if clicks is not None and clicks < gates.gate_min_clicks:
        checks.append(
            Check(
                "eval_clicks",
                False,
                clicks,
                float(gates.gate_min_clicks),
                f"the evaluation day has {clicks:.0f} clicks, fewer than gate_min_clicks "
                f"{gates.gate_min_clicks}: too few to decide",
                undecided=True,
            )
        )
    if gates.gate_peers:
        peer = _value(challenger, "best_peer_auc")
        if peer is not None and auc is not None:
            difference = _interval(challenger, "auc_vs_best_peer")
            low, high = difference if difference is not None else (auc - peer, auc - peer)
            passed = high >= 0.0
            checks.append(
                Check(
                    "auc_vs_best_peer",
                    passed,
                    auc,
                    peer,
                    f"ranker AUC {auc:.4f} vs best peer {peer:.4f}: difference 95% CI "
                    f"{low:+.4f}…{high:+.4f} "
                    + ("reaches 0" if passed else "is below 0: worse than a peer beyond the CI"),
                )
            )
    if champion is not None:
        for name, tolerance in (
            ("auc", gates.gate_auc_tolerance),
            (recall, gates.gate_recall_tolerance),
        ):
            theirs = _value(champion, name)
            if theirs is None:
                checks.append(
                    Check(
                        f"{name}_vs_champion",
                        False,
                        _value(challenger, name),
                        None,
                        f"the champion's {name} on this day is missing",
                    )
                )
                continue
            mine = _value(challenger, name)
            difference = _difference_interval(challenger, champion, name)
            interval = None
            if difference is not None:
                interval = (theirs + difference[0], theirs + difference[1])
            checks.append(
                at_least(
                    f"{name}_vs_champion",
                    mine,
                    theirs - tolerance,
                    f"champion {theirs:.4f} − tolerance {tolerance:g}",
                    interval,
                )
            )
    result = GateResult(False, tuple(checks), champion is not None)
    verdict = result.verdict
    promote = verdict == PROMOTE or (verdict == INSUFFICIENT and champion is None)
    return GateResult(promote, tuple(checks), champion is not None)


def _calibration(challenger: Mapping[str, Any], gates: LifecycleSettings) -> Check:
    ratio = _value(challenger, "calibration_ratio")
    low, high = gates.gate_calibration_min, gates.gate_calibration_max
    if ratio is None:
        return Check("calibration_ratio", False, None, None, "calibration_ratio is missing")
    interval = _interval(challenger, "calibration")
    reach = interval if interval is not None else (ratio, ratio)
    inside = reach[1] >= low and reach[0] <= high
    bound = low if reach[1] < low else high
    span = f" (95% CI from the click count {reach[0]:.3f}–{reach[1]:.3f})" if interval else ""
    return Check(
        "calibration_ratio",
        inside,
        ratio,
        bound,
        f"calibration_ratio {ratio:.4f}{span} {'reaches' if inside else 'is outside'} "
        f"[{low:.3f}, {high:.3f}]",
    )


# --------------------------------------------------------------------------- the decision


NO_CHAMPION = "no_champion"
LATER_CHAMPION = "later_champion"
SAME_DAY = "same_day"
EARLIER_CHAMPION = "earlier_champion"
ChampionBasis = Literal["no_champion", "later_champion", "same_day", "earlier_champion"]


def champion_basis(champion: Mapping[str, Any] | None, date: dt.date) -> ChampionBasis:
    """Which of the champion's numbers on ``date`` the gate compares with.

    - ``no_champion``: nothing serves; the absolute bounds alone decide;
    - ``later_champion``: the champion was built for a day after ``date`` (a backfill of an
      older day): a model of an earlier day is never promoted over it, nothing to measure;
    - ``same_day``: the champion was itself judged on ``date``: its numbers are on record;
    - ``earlier_champion``: the champion must be re-measured on ``date`` (the caller's job: it
      reads files), then compared.
    """
    if champion is None:
        return NO_CHAMPION
    built_for = dt.date.fromisoformat(str(champion["date"]))
    if built_for > date:
        return LATER_CHAMPION
    if built_for == date:
        return SAME_DAY
    return EARLIER_CHAMPION


def recorded_champion_metrics(champion: Mapping[str, Any]) -> dict[str, Any]:
    """The champion's own evaluation on the day it was judged (the ``same_day`` basis)."""
    return dict(champion.get("metrics", {}).get("challenger", {}))


def decide(
    date: dt.date,
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    champion_metrics: Mapping[str, Any] | None,
    gates: LifecycleSettings,
) -> GateResult:
    """The gate's decision for D's challenger, from evidence already gathered.

    Args:
        date: D, the day the challenger was built for and evaluated on.
        challenger: the challenger's evaluation summary on D.
        champion: the serving champion's decision record (``date``, ``metrics``…), or None.
        champion_metrics: the champion's numbers on D — recorded (``same_day``) or re-measured
            (``earlier_champion``); ignored for the other bases.
        gates: the thresholds of ``settings.lifecycle``.

    Raises:
        ValueError: the champion must be compared on D but ``champion_metrics`` is None.
    """
    basis = champion_basis(champion, date)
    if basis == NO_CHAMPION:
        return judge(challenger, None, gates)
    if basis == LATER_CHAMPION:
        assert champion is not None
        rule = (
            f"a champion built for {champion['date']} (after {date}) is serving; a model "
            "of an earlier day is never promoted over it"
        )
        return GateResult(False, (Check("champion_date", False, None, None, rule),), True)
    if champion_metrics is None:
        raise ValueError(
            f"the gate for {date} compares with the champion built for "
            f"{champion['date'] if champion else None} but was given no champion metrics on "
            f"{date}; measure the champion on that day first"
        )
    return judge(challenger, champion_metrics, gates)
