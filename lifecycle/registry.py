"""The model registry and gated promotion (DESIGN.md, "MLflow … registered models, aliases, gates").

Each daily run trains a new pair — towers and ranker — which is registered as a new version of
``deepclick-towers`` and ``deepclick-ranker`` and becomes ``challenger``. It is promoted to
``champion`` (and becomes the release serving loads) only if its evaluation passes the gates of
``settings.lifecycle`` against the current champion measured on the *same* evaluation day; the
first model ever only has to pass the absolute bounds (the gate itself: ``lifecycle/gate.py``).

Every promotion and refusal is appended to ``<root>/registry/decisions.jsonl`` — when, what, the
metrics and checks that decided. That ledger is the source of truth for "who is champion" and
"what served on day X" (:func:`served_on`): it works without MLflow and survives a rebuilt
tracking server. MLflow aliases and model-version tags mirror it (:class:`MlflowRegistry`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deepclick import layout
from deepclick.settings import MlflowSettings, Settings

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
    return layout.registry_dir(settings.root)


def decisions_path(settings: Settings) -> Path:
    return registry_dir(settings) / DECISIONS_FILE


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
