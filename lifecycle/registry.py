"""The model registry and gated promotion (DESIGN.md, "MLflow … registered models, aliases, gates").

Each daily run trains a new pair — towers and ranker — which is registered as a new version of
``deepclick-towers`` and ``deepclick-ranker`` and becomes ``challenger``. It is promoted to
``champion`` (and becomes the release serving loads) only if its evaluation passes the gates of
``settings.lifecycle`` against the current champion measured on the *same* evaluation day; the
first model ever only has to pass the absolute bounds.

Every promotion and refusal is appended to ``<root>/registry/decisions.jsonl`` — when, what, the
metrics and checks that decided. That ledger is the source of truth for "who is champion" and
"what served on day X" (:func:`served_on`): it works without MLflow and survives a rebuilt
tracking server. MLflow aliases and model-version tags mirror it (:class:`MlflowRegistry`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deepclick.settings import LifecycleSettings, MlflowSettings, Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DECISIONS_FILE = "decisions.jsonl"
PROMOTED = "promoted"
REFUSED = "refused"
ModelKind = Literal["towers", "ranker"]
MODEL_KINDS: tuple[ModelKind, ...] = ("towers", "ranker")


def registry_dir(settings: Settings) -> Path:
    return settings.root / "registry"


def decisions_path(settings: Settings) -> Path:
    return registry_dir(settings) / DECISIONS_FILE


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


def _difference_interval(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], key: str
) -> tuple[float, float] | None:
    """Interval of challenger − champion from the two summaries' intervals, taken as independent
    (a conservative width: the two were measured on the same rows, which only narrows it)."""
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
      ``gate_recall_tolerance`` recall@K — judged on the interval of the difference, so an
      interval wider than the tolerance is insufficient evidence, not a pass or a refusal;
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


# --------------------------------------------------------------------------- the decision ledger


def append_decision(settings: Settings, record: Mapping[str, Any]) -> dict[str, Any]:
    """Append one decision to ``decisions.jsonl`` (flushed to disk before returning) and return it
    with its ``id`` and ``decided_at``. The file is only ever appended to: history is evidence."""
    entry = {
        "id": uuid.uuid4().hex,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **record,
    }
    if entry.get("action") not in (PROMOTED, REFUSED):
        raise ValueError(
            f"a decision's action is {PROMOTED!r} or {REFUSED!r}, not {entry.get('action')!r}"
        )
    path = decisions_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return entry


def read_decisions(settings: Settings) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first. A torn last line (a crash mid-append) is skipped."""
    path = decisions_path(settings)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not a JSON record (torn write?); skipped", path, number)
    return records


def find_decision(settings: Settings, decision_id: str) -> dict[str, Any] | None:
    return next((r for r in read_decisions(settings) if r.get("id") == decision_id), None)


def current_champion(settings: Settings) -> dict[str, Any] | None:
    """The latest promotion in the ledger, or None before the first one."""
    promoted = [r for r in read_decisions(settings) if r.get("action") == PROMOTED]
    return promoted[-1] if promoted else None


@dataclass(frozen=True)
class ServedModel:
    """What served on a day: the release, the model versions in it and the decision behind it."""

    date: str
    built_for: str
    release: str
    ranker_version: str
    towers_version: str
    registered: dict[str, str | None]
    decided_at: str
    decision_id: str
    metrics: dict[str, Any]


def served_on(settings: Settings, date: dt.date | str) -> ServedModel | None:
    """The model that served on ``date``, or None when nothing had been promoted yet.

    Days are logical: the run for day D trains on the days before D, is judged on D, and — once
    D's logs are complete — serves from D + 1. So the answer is the promotion with the latest
    evaluation day before ``date`` (ledger order breaks ties: a re-run promoted later wins). That
    makes the answer the same for a backfill as for a run that happened on schedule.
    """
    day = dt.date.fromisoformat(date) if isinstance(date, str) else date
    best: dict[str, Any] | None = None
    for record in read_decisions(settings):
        if record.get("action") != PROMOTED:
            continue
        built = dt.date.fromisoformat(str(record["date"]))
        if built < day and (best is None or built >= dt.date.fromisoformat(str(best["date"]))):
            best = record
    if best is None:
        return None
    challenger = best.get("challenger", {})
    return ServedModel(
        date=day.isoformat(),
        built_for=str(best["date"]),
        release=str(best.get("release")),
        ranker_version=str(challenger.get("ranker", {}).get("version")),
        towers_version=str(challenger.get("towers", {}).get("version")),
        registered={k: challenger.get(k, {}).get("registered_version") for k in MODEL_KINDS},
        decided_at=str(best["decided_at"]),
        decision_id=str(best["id"]),
        metrics=dict(best.get("metrics", {}).get("challenger", {})),
    )


# --------------------------------------------------------------------------- MLflow mirror


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


class MlflowRegistry:
    """Registered models, versions and aliases in MLflow, mirroring the ledger.

    Aliases, not stages: ``champion`` and ``challenger`` point at model versions, and moving one
    is a single call (``MlflowClient.set_registered_model_alias``).
    """

    def __init__(self, client: MlflowClient, settings: MlflowSettings) -> None:
        self.client = client
        self.names: dict[str, str] = {
            "ranker": settings.ranker_model,
            "towers": settings.towers_model,
        }

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            self.client.create_registered_model(
                name, description="deepclick daily models; aliases champion / challenger"
            )

    def register(
        self, kind: ModelKind, run_id: str, artifact_path: str, tags: Mapping[str, Any]
    ) -> str:
        """Register the folder logged under ``artifact_path`` of run ``run_id`` as a new version
        and point ``challenger`` at it; return the version number."""
        name = self.names[kind]
        self._ensure_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self.client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            await_creation_for=0,
        ).version
        self.client.set_registered_model_alias(name, CHALLENGER, str(version))
        return str(version)

    def alias(self, kind: ModelKind, alias: str) -> str | None:
        """The version an alias points at, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.names[kind], alias).version)
        except MlflowException as exc:
            if _not_found(exc) or "alias" in str(exc).lower():
                return None
            raise

    def record(self, decision: Mapping[str, Any]) -> None:
        """Mirror a ledger decision: tags on the challenger's versions and, when promoted, the
        ``champion`` alias moved to them (``challenger`` is cleared: it has been decided)."""
        challenger = decision.get("challenger", {})
        tags = {
            "deepclick.decision": decision["action"],
            "deepclick.decision_id": decision["id"],
            "deepclick.decided_at": decision["decided_at"],
            "deepclick.reason": str(decision.get("reason", ""))[:4000],
        }
        for key, value in decision.get("metrics", {}).get("challenger", {}).items():
            tags[f"deepclick.metric.{key}"] = value
        for kind in MODEL_KINDS:
            version = challenger.get(kind, {}).get("registered_version")
            if version is None:
                continue
            name = self.names[kind]
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, str(value))
            if decision["action"] == PROMOTED:
                self.client.set_registered_model_alias(name, CHAMPION, str(version))
                if self.alias(kind, CHALLENGER) == str(version):
                    self.client.delete_registered_model_alias(name, CHALLENGER)
