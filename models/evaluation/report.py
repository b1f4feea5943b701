"""The offline ranking report: one exported ranker version on one evaluation set.

``evaluate_ranking`` loads a model version the way serving does (the in-process predictor over the
SavedModel, not the Keras object from training), scores an evaluation set — by default a features
folder's ``eval`` table, i.e. a day the model never trained on — and writes ``metrics.json``,
``report.md``, ``roc.png`` and ``reliability.png`` into an output folder. Comparison models (the
LR baseline, an older version) are scored on the same rows. Anything that would make a number
meaningless stops the report with an error that names the problem: an empty day, a day with one
class only, or a model paired with another feature-spec (or embeddings) version than the data.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepclick.layout import SPEC_FILE
from deepclick.publish import current_version
from models.evaluation.plots import reliability_plot, roc_plot
from models.evaluation.ranking import (
    EmptyEvaluationError,
    EvaluationError,
    SingleClassError,
    auc_difference_interval,
    ranking_metrics,
)
from models.feature_spec import FeatureSpec, load_feature_spec
from models.ranker.inputs import SimilarityProvider
from models.ranker.predictor import InProcessPredictor

Scorer = Callable[[pd.DataFrame], np.ndarray]
"""A comparison model: rows of the evaluation set → click probabilities."""

EVAL_TABLE = "eval"
PLACEMENT = "placement_id"
PREDICTIONS_FILE = "predictions.parquet"
"""Every evaluation row's label and each model's probability, in row order: what a later paired
comparison on the same rows (champion vs challenger) reads."""
MARKDOWN_PLACEMENTS = 20
"""Placements listed in the markdown report (all of them are in metrics.json)."""


class VersionMismatchError(EvaluationError):
    """The model expects another feature-spec (or embeddings) version than the data provides."""


@dataclass(frozen=True)
class EvaluationSet:
    """Rows to evaluate on, with the spec that describes them when known."""

    frame: pd.DataFrame
    description: str
    spec: FeatureSpec | None = None


@dataclass
class RankingReport:
    """What :func:`evaluate_ranking` wrote and measured."""

    output: Path
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def auc(self) -> float:
        return float(self.metrics["models"]["ranker"]["auc"])


def load_evaluation_set(
    source: Path | str | pd.DataFrame, spec: FeatureSpec | None = None
) -> EvaluationSet:
    """A features folder (its ``eval`` table and spec), a Parquet file or folder, or a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return EvaluationSet(source, "the given rows", spec)
    path = Path(source)
    if (path / SPEC_FILE).is_file():
        folder_spec = load_feature_spec(path)
        table = path / EVAL_TABLE
        frame = pd.read_parquet(table) if table.exists() else pd.DataFrame()
        day = folder_spec.target_date
        return EvaluationSet(frame, f"{path} eval (day {day})", folder_spec)
    if not path.exists():
        raise FileNotFoundError(f"evaluation set {path} does not exist")
    return EvaluationSet(pd.read_parquet(path), str(path), spec)


def open_model(model: Path | str | InProcessPredictor) -> InProcessPredictor:
    """A loaded model version: a predictor, a version folder, or a model folder (``<repo>/<name>``,
    whose ``CURRENT`` version, else the highest, is taken)."""
    if isinstance(model, InProcessPredictor):
        return model
    path = Path(model)
    if not (path / "saved_model.pb").is_file() and path.is_dir():
        chosen = current_version(path)
        if chosen is None:
            numeric = sorted((p.name for p in path.iterdir() if p.name.isdigit()), key=int)
            chosen = numeric[-1] if numeric else None
        if chosen is None:
            raise FileNotFoundError(f"{path} holds no model version (no CURRENT, no NNN folder)")
        path = path / chosen
    return InProcessPredictor(path)


def _check_versions(
    predictor: InProcessPredictor,
    data: EvaluationSet,
    similarity: SimilarityProvider | None,
    allow_mismatch: bool,
) -> list[str]:
    """Raise :class:`VersionMismatchError` unless the pairing holds; return notes when allowed."""
    notes: list[str] = []
    expected = predictor.feature_spec_version
    if data.spec is not None and expected is not None and data.spec.version != expected:
        message = (
            f"model {predictor.path} was trained on feature spec {expected} but the evaluation set "
            f"({data.description}) comes from feature spec {data.spec.version}"
        )
        if not allow_mismatch:
            raise VersionMismatchError(
                f"{message}; evaluate on the features folder {expected}, or pass "
                "allow_version_mismatch=True to score it anyway (inputs are then checked by name)"
            )
        notes.append(message)
    if similarity is not None and predictor.uses_similarity:
        trained_with = predictor.embedding_version
        if trained_with is not None and str(similarity.version) != str(trained_with):
            message = (
                f"model {predictor.path} was trained with embeddings {trained_with} but the "
                f"similarity provider serves embeddings {similarity.version}"
            )
            if not allow_mismatch:
                raise VersionMismatchError(f"{message}; pair them as a release would")
            notes.append(message)
    needed = [
        n for n in predictor.input_names() if not (n.startswith("sim_") and similarity is not None)
    ]
    absent = [n for n in needed if n not in data.frame.columns]
    if absent and not data.frame.empty:
        raise VersionMismatchError(
            f"the evaluation set ({data.description}) lacks input(s) {', '.join(absent)} that "
            f"model {predictor.path} (feature spec {expected}) takes"
        )
    return notes


def _truth(frame: pd.DataFrame, truth: pd.DataFrame | np.ndarray | str | None) -> np.ndarray | None:
    """True click probabilities aligned with ``frame``: a column name, an array in row order, or a
    table keyed by ``event_id`` (or ``impression_id``) with ``p_click``."""
    if truth is None:
        return frame["p_click"].to_numpy() if "p_click" in frame.columns else None
    if isinstance(truth, str):
        return frame[truth].to_numpy()
    if isinstance(truth, pd.DataFrame):
        key = "event_id" if "event_id" in truth.columns else "impression_id"
        lookup = truth.set_index(truth[key].astype(str))["p_click"]
        values = frame["event_id"].astype(str).map(lookup)
        if values.isna().any():
            raise EvaluationError(
                f"{int(values.isna().sum())} evaluation rows have no ground-truth p_click"
            )
        return values.to_numpy(dtype=np.float64)
    values = np.asarray(truth, dtype=np.float64).reshape(-1)
    if values.size != len(frame):
        raise EvaluationError(f"truth has {values.size} values for {len(frame)} evaluation rows")
    return values


def evaluate_ranking(
    model: Path | str | InProcessPredictor,
    eval_data: Path | str | pd.DataFrame,
    output: Path | str,
    *,
    feature_spec: FeatureSpec | None = None,
    similarity: SimilarityProvider | None = None,
    truth: pd.DataFrame | np.ndarray | str | None = None,
    baselines: Mapping[str, Scorer] | None = None,
    bootstrap: int = 200,
    seed: int = 7,
    allow_version_mismatch: bool = False,
) -> RankingReport:
    """Score ``eval_data`` with an exported ranker and write the report into ``output``.

    Args:
        model: a version folder, a model folder (its CURRENT version) or a loaded predictor.
        eval_data: a features folder (its ``eval`` table), a Parquet path or a DataFrame.
        output: folder for ``metrics.json``, ``report.md``, ``roc.png``, ``reliability.png``.
        feature_spec: the spec of ``eval_data`` when it is not a features folder (for the
            version check).
        similarity: two-tower scores, needed when the model was trained with them.
        truth: ground-truth click probabilities (simulated data) for the oracle AUC; a
            ``p_click`` column of the rows is used when present.
        baselines: comparison models by name, scored on the same rows.
        bootstrap: resamples of the AUC confidence interval (0: none).
        seed: seed of the resampling.
        allow_version_mismatch: score a model on data of another feature-spec or embeddings
            version (a back-test) instead of refusing.

    Raises:
        EmptyEvaluationError: the evaluation set has no rows.
        SingleClassError: the evaluation set has only clicks or only non-clicks.
        VersionMismatchError: model and data (or embeddings) versions differ, or inputs are absent.
    """
    predictor = open_model(model)
    data = load_evaluation_set(eval_data, feature_spec)
    notes = _check_versions(predictor, data, similarity, allow_version_mismatch)
    frame = data.frame
    label = data.spec.label if data.spec is not None else "label"
    if frame.empty:
        raise EmptyEvaluationError(
            f"evaluation set {data.description} has no rows: the day had no impressions, so "
            "there is nothing to evaluate; choose a day with traffic"
        )
    labels = frame[label].to_numpy().astype(int)
    clicks = int(labels.sum())
    if clicks in (0, labels.size):
        kind = "non-clicks" if clicks == 0 else "clicks"
        raise SingleClassError(
            f"evaluation set {data.description}: all {labels.size} impressions are {kind}, so AUC "
            "is undefined (it compares clicks with non-clicks); evaluate on a day with both"
        )
    scores: dict[str, np.ndarray] = {
        "ranker": predictor.predict_frame(frame, similarity=similarity)
    }
    for name, scorer in (baselines or {}).items():
        scores[name] = np.asarray(scorer(frame), dtype=np.float64).reshape(-1)
    oracle = _truth(frame, truth)
    placements = frame[PLACEMENT].astype(str).to_numpy() if PLACEMENT in frame.columns else None
    per_model = {
        name: ranking_metrics(labels, p, groups=placements, bootstrap=bootstrap, seed=seed)
        for name, p in scores.items()
    }
    metrics: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "path": str(predictor.path),
            "version": predictor.version,
            "feature_spec_version": predictor.feature_spec_version,
            "embedding_version": predictor.embedding_version,
            "architecture": predictor.manifest.get("architecture"),
        },
        "evaluation_set": {
            "description": data.description,
            "feature_spec_version": data.spec.version if data.spec is not None else None,
            "rows": int(labels.size),
            "clicks": clicks,
            "ctr": clicks / labels.size,
        },
        "notes": notes,
        "models": per_model,
    }
    if oracle is not None:
        metrics["oracle"] = ranking_metrics(labels, oracle, bootstrap=0)
    for name in scores:
        if name != "ranker":
            difference, low, high = auc_difference_interval(
                labels, scores["ranker"], scores[name], samples=bootstrap, seed=seed
            )
            metrics.setdefault("gaps", {})[name] = {
                "auc": difference,
                "auc_ci95": [low, high],
                "logloss": per_model[name]["logloss"] - per_model["ranker"]["logloss"],
            }
    if len(scores) > 1:
        best = max((n for n in scores if n != "ranker"), key=lambda n: per_model[n]["auc"])
        gap = metrics["gaps"][best]
        metrics["best_peer"] = {
            "name": best,
            "auc": per_model[best]["auc"],
            "auc_difference": gap["auc"],
            "auc_difference_ci95": gap["auc_ci95"],
        }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"ranker {predictor.version} on {data.description}"
    files = {
        "roc": roc_plot(labels, scores, out / "roc.png", title=f"ROC — {title}"),
        "reliability": reliability_plot(
            labels, scores, out / "reliability.png", title="Reliability"
        ),
    }
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(render_markdown(metrics, title), encoding="utf-8")
    files["json"] = out / "metrics.json"
    files["json"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    files["predictions"] = out / PREDICTIONS_FILE
    pd.DataFrame({"label": labels, **scores}).to_parquet(files["predictions"], index=False)
    return RankingReport(out, metrics, files)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(metrics: Mapping[str, Any], title: str) -> str:
    """The human-readable report: headline table, gaps to baselines, per-placement table, plots."""
    data = metrics["evaluation_set"]
    lines = [
        f"# Ranking evaluation — {title}",
        "",
        f"- evaluation rows: {data['rows']}, clicks: {data['clicks']}, CTR {data['ctr']:.4f}",
        f"- model: version {metrics['model']['version']}, feature spec "
        f"{metrics['model']['feature_spec_version']}, embeddings "
        f"{metrics['model']['embedding_version'] or '—'}, {metrics['model']['architecture']}",
    ]
    lines += [f"- note: {note}" for note in metrics.get("notes", [])]
    lines += [
        "",
        "| model | AUC | AUC 95% CI | logloss | normalized entropy | calibration (pred/obs) "
        "| calibration 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["models"].items():
        ci = m.get("auc_ci95")
        interval = f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "—"
        cal = m.get("calibration_ci95")
        cal_interval = f"{cal[0]:.3f} – {cal[1]:.3f}" if cal else "—"
        lines.append(
            f"| {name} | {m['auc']:.4f} | {interval} | {m['logloss']:.4f} | "
            f"{m['normalized_entropy']:.4f} | {m['calibration_ratio']:.3f} | {cal_interval} |"
        )
    if "oracle" in metrics:
        o = metrics["oracle"]
        lines.append(
            f"| oracle (true p) | {o['auc']:.4f} | — | {o['logloss']:.4f} | "
            f"{o['normalized_entropy']:.4f} | {o['calibration_ratio']:.3f} | — |"
        )
    if metrics.get("gaps"):
        lines += ["", "Ranker minus each peer on the same rows (paired bootstrap 95% CI):", ""]
    for name, gap in metrics.get("gaps", {}).items():
        ci = gap.get("auc_ci95")
        span = f" (CI {ci[0]:+.4f} … {ci[1]:+.4f})" if ci else ""
        lines.append(
            f"- vs {name}: AUC {gap['auc']:+.4f}{span}, logloss {gap['logloss']:+.4f} lower"
        )
    best = metrics.get("best_peer")
    if best:
        ci = best["auc_difference_ci95"]
        verdict = "worse than" if ci[1] < 0 else "not worse than"
        lines += [
            "",
            f"The ranker is **{verdict}** the best peer ({best['name']}, AUC {best['auc']:.4f}) "
            "beyond the interval.",
        ]
    ranker = metrics["models"]["ranker"]
    if ranker.get("per_placement"):
        shown = ranker["per_placement"][:MARKDOWN_PLACEMENTS]
        lines += [
            "",
            f"## Per placement (largest {len(shown)} of {len(ranker['per_placement'])})",
            "",
            "| placement | impressions | clicks | predicted clicks | calibration | AUC |",
            "|---|---|---|---|---|---|",
        ]
        for row in shown:
            lines.append(
                f"| {row['group']} | {row['impressions']} | {row['clicks']} | "
                f"{row['predicted_clicks']:.1f} | {_fmt(row['calibration_ratio'], 3)} | "
                f"{_fmt(row['auc'])} |"
            )
    lines += ["", "## Plots", "", "![ROC](roc.png)", "", "![Reliability](reliability.png)", ""]
    return "\n".join(lines)
