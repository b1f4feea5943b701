"""What the served slates are worth against the truth: the replay's numbers (pure numpy).

The replay (``lifecycle/replay.py``) sends the evaluation day's requests (user, placement, hour)
through the serving path and through every comparator — the oracle slate, popularity, random live
ads, the ranker without its candidate stage, ... — and reads the true click probability of every
slot from the generated world. This module turns those ``[requests, slots]`` matrices of true
probabilities into the report: the expected CTR of the top-1/5/10, each comparator as a share of
the oracle and as a multiple of popularity, with percentile bootstrap intervals over requests
(the same resampled requests for numerator and denominator, so the ratio's interval is paired).

An empty slot (a slate shorter than K) earns nothing: it counts as probability 0, so a system that
returns fewer ads is not flattered by averaging over fewer slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ORACLE = "oracle"
POPULARITY = "popularity"
SLATE_KS: tuple[int, ...] = (1, 5, 10)


def slate_ctr(slates: np.ndarray, k: int) -> np.ndarray:
    """Per request, the expected CTR of the top-``k`` slots: the mean true probability of the
    first ``k`` ads (NaN = empty slot = 0)."""
    p = np.asarray(slates, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"slates must be [requests, slots], got shape {p.shape}")
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    top = np.nan_to_num(p[:, :k], nan=0.0)
    padded = np.zeros((p.shape[0], k))
    padded[:, : top.shape[1]] = top
    return padded.mean(axis=1)


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return [float(low), float(high)]


def replay_report(
    slates: Mapping[str, np.ndarray],
    *,
    ks: Sequence[int] = SLATE_KS,
    oracle: str = ORACLE,
    popularity: str = POPULARITY,
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 7,
) -> dict[str, Any]:
    """The replay's numbers for every comparator in ``slates`` (name → ``[requests, slots]`` true
    click probabilities, rows = the same requests in the same order).

    Returns ``{"requests", "ks", "systems": {name: {"top_<k>": {"expected_ctr", "ctr_ci95",
    "share_of_oracle", "share_of_oracle_ci95", "x_popularity", "x_popularity_ci95"}}}}``; the
    ratios are missing when ``oracle`` / ``popularity`` is not among the slates.

    Raises:
        ValueError: no slates, slates of different request counts, or no requests.
    """
    if not slates:
        raise ValueError("the replay has no slates to report")
    counts = {name: np.asarray(s).shape[0] for name, s in slates.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every comparator must answer the same requests, got {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise ValueError("the replay has no requests")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(bootstrap, n)) if bootstrap else None
    systems: dict[str, dict[str, Any]] = {name: {} for name in slates}
    for k in ks:
        per_request = {name: slate_ctr(s, k) for name, s in slates.items()}
        means = {name: float(v.mean()) for name, v in per_request.items()}
        resampled = (
            {name: v[draws].mean(axis=1) for name, v in per_request.items()}
            if draws is not None
            else None
        )
        for name in slates:
            entry: dict[str, Any] = {"expected_ctr": means[name]}
            if resampled is not None:
                entry["ctr_ci95"] = _interval(resampled[name], level)
            for key, base in (("share_of_oracle", oracle), ("x_popularity", popularity)):
                if base not in slates or means[base] <= 0.0:
                    continue
                entry[key] = means[name] / means[base]
                if resampled is not None:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratios = resampled[name] / resampled[base]
                    entry[f"{key}_ci95"] = _interval(ratios[np.isfinite(ratios)], level)
            systems[name][f"top_{k}"] = entry
    return {"requests": int(n), "ks": [int(k) for k in ks], "systems": systems}


def render_replay_markdown(report: Mapping[str, Any], *, k: int = 10) -> str:
    """The replay section of the evaluation report: one row per comparator at top-``k``."""
    lines = [
        f"## Replay against the truth ({report['requests']} requests of the evaluation day)",
        "",
        f"Expected CTR of the top-{k} slate from the world's true click probabilities, 95% "
        "bootstrap intervals over requests.",
        "",
        "| system | top-1 CTR | top-5 CTR | top-10 CTR | share of oracle | × popularity |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report["systems"].items():
        cells = []
        for kk in (1, 5, 10):
            e = entry.get(f"top_{kk}")
            cells.append("—" if e is None else f"{e['expected_ctr']:.4f}")
        top = entry.get(f"top_{k}", {})
        ratios = []
        for key in ("share_of_oracle", "x_popularity"):
            value, ci = top.get(key), top.get(f"{key}_ci95")
            if value is None:
                ratios.append("—")
            elif ci:
                ratios.append(f"{value:.3f} ({ci[0]:.3f}–{ci[1]:.3f})")
            else:
                ratios.append(f"{value:.3f}")
        lines.append(f"| {name} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    descriptions = report.get("descriptions", {})
    if descriptions:
        lines += [""] + [f"- **{name}**: {text}" for name, text in descriptions.items()]
    return "\n".join(lines) + "\n"


def replay_plot(report: Mapping[str, Any], path: Path, *, k: int = 10) -> Path:
    """Top-``k`` expected CTR per comparator with its bootstrap interval, as a bar chart."""
    names = list(report["systems"])
    values = [report["systems"][n][f"top_{k}"]["expected_ctr"] for n in names]
    errors = np.zeros((2, len(names)))
    for i, name in enumerate(names):
        ci = report["systems"][name][f"top_{k}"].get("ctr_ci95")
        if ci:
            errors[:, i] = [values[i] - ci[0], ci[1] - values[i]]
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    axes.barh(names, values, xerr=np.maximum(errors, 0.0), color="tab:blue", alpha=0.8)
    axes.invert_yaxis()
    axes.set_xlabel(f"expected CTR of the top-{k} slate (true click probability)")
    axes.set_title(f"Replay of {report['requests']} requests against the truth")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
