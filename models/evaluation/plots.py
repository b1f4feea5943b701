"""ROC curves and reliability diagrams as PNG files, for the evaluation report.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so
plotting works headless and never disturbs another component's matplotlib state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from models.evaluation.ranking import auc, reliability


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def roc_plot(labels: Any, scores: Mapping[str, Any], path: Path, *, title: str = "ROC") -> Path:
    """One ROC curve per model in ``scores`` (name → probabilities), AUC in the legend."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot()
    y = np.asarray(labels)
    for name, p in scores.items():
        fpr, tpr, _ = roc_curve(y, np.asarray(p))
        axes.plot(fpr, tpr, label=f"{name} (AUC {auc(y, p):.4f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def reliability_plot(
    labels: Any,
    scores: Mapping[str, Any],
    path: Path,
    *,
    bins: int = 10,
    title: str = "Reliability",
) -> Path:
    """Mean predicted vs observed click rate per quantile bin, one line per model; points on the
    diagonal are calibrated. Log axes, since CTRs span orders of magnitude."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot()
    lowest, highest = 1.0, 0.0
    for name, p in scores.items():
        points = reliability(labels, p, bins=bins)
        x = [pt["mean_predicted"] for pt in points]
        y = [pt["observed_rate"] for pt in points]
        axes.plot(x, y, marker="o", label=name)
        positive = [v for v in x + y if v > 0]
        if positive:
            lowest, highest = min(lowest, *positive), max(highest, *positive)
    if highest > 0:
        axes.plot([lowest, highest], [lowest, highest], linestyle=":", color="grey", label="ideal")
        axes.set_xscale("log")
        axes.set_yscale("log")
    axes.set_xlabel("mean predicted CTR")
    axes.set_ylabel("observed CTR")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)
