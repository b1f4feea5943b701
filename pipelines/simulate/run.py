"""The runner of ``deepclick simulate``: build the world, then generate and write day after day.

It wires the pure generators (world.py, impressions.py) to the writer and reports what was made;
it holds no generation logic of its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from deepclick.settings import SimulateSettings
from pipelines.simulate.impressions import LoggingPolicy, make_world, plan_day, simulate_day
from pipelines.simulate.writer import (
    TRUTH_DIR,
    WORLD_FILE,
    csv_bytes,
    open_day,
    save_world,
    user_profile_table,
)


@dataclass(frozen=True)
class DaySummary:
    """What one day folder holds."""

    date: str
    impressions: int
    clicks: int
    ctr: float
    mean_p_click: float
    oracle_auc: float
    live_ads: int
    live_placements: int
    new_ads: int
    new_placements: int


@dataclass(frozen=True)
class SimulationSummary:
    """What a simulation produced; ``oracle_auc`` is the AUC of the true p against the clicks,
    the ceiling any ranker trained on these logs can reach."""

    out_dir: Path
    impressions: int
    clicks: int
    ctr: float
    oracle_auc: float
    intercept: float
    seconds: float
    days: list[DaySummary] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["out_dir"] = str(self.out_dir)
        return result

    def as_rows(self) -> dict[str, Any]:
        """Flat key → value pairs for a console table (the CLI prints these)."""
        last = self.days[-1]
        return {
            "out_dir": str(self.out_dir),
            "days": f"{self.days[0].date} .. {last.date} ({len(self.days)})",
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": f"{self.ctr:.4f}",
            "oracle_auc": f"{self.oracle_auc:.4f}",
            "new_ads": sum(d.new_ads for d in self.days),
            "new_placements": sum(d.new_placements for d in self.days),
            "live_ads_last_day": last.live_ads,
            "live_placements_last_day": last.live_placements,
            "rows_per_second": round(self.impressions / max(self.seconds, 1e-9)),
            "seconds": f"{self.seconds:.1f}",
        }


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, tied scores share their average rank)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    positives = labels[order].astype(bool)
    n_pos = int(positives.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_scores)])
    ranks = np.repeat(starts + (sizes + 1) / 2.0, sizes)  # 1-based average rank of each tie run
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]simulate[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def run_simulate(
    settings: SimulateSettings, out_dir: Path, progress: bool = True
) -> SimulationSummary:
    """Generate ``settings.days`` days of marketplace logs and their ground truth under ``out_dir``.

    Same settings → byte-identical CSV, Parquet and npz files (day manifests differ only in
    ``created_at``). Existing day folders of the same dates are replaced atomically.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    world = make_world(settings)
    policy = LoggingPolicy.from_settings(settings)
    save_world(world, out_dir / TRUTH_DIR / WORLD_FILE)
    users_csv = csv_bytes(user_profile_table(world))
    per_day = settings.impressions_per_day
    all_p: list[np.ndarray] = []
    all_clk: list[np.ndarray] = []
    days: list[DaySummary] = []
    with _progress(progress) as bar:
        task = bar.add_task("world ready", total=settings.days * per_day)
        for day, date in enumerate(world.dates):
            bar.update(task, description=date.isoformat())
            plan = plan_day(world, day, per_day)
            with open_day(
                out_dir, date, world, plan.live_ads, plan.live_placements, users_csv
            ) as log:
                p_parts, clk_parts = [], []
                for batch in simulate_day(world, plan, policy, first_no=day * per_day):
                    log.write(batch)
                    p_parts.append(batch.p_click)
                    clk_parts.append(batch.clk)
                    bar.advance(task, len(batch))
                p, clk = np.concatenate(p_parts), np.concatenate(clk_parts)
                summary = DaySummary(
                    date=date.isoformat(),
                    impressions=len(p),
                    clicks=int(clk.sum()),
                    ctr=float(clk.mean()),
                    mean_p_click=float(p.mean()),
                    oracle_auc=roc_auc(p, clk),
                    live_ads=len(plan.live_ads),
                    live_placements=len(plan.live_placements),
                    new_ads=int((world.ad_birth[plan.live_ads] == day).sum()) if day else 0,
                    new_placements=(
                        int((world.placement_birth[plan.live_placements] == day).sum())
                        if day
                        else 0
                    ),
                )
                log.manifest.update(
                    {
                        "inputs": {},  # generated from settings alone
                        "settings": settings.model_dump(),
                        "counts": {
                            k: getattr(summary, k)
                            for k in (
                                "impressions",
                                "clicks",
                                "live_ads",
                                "live_placements",
                                "new_ads",
                                "new_placements",
                            )
                        },
                        "metrics": {
                            "ctr": summary.ctr,
                            "mean_p_click": summary.mean_p_click,
                            "oracle_auc": summary.oracle_auc,
                        },
                    }
                )
            days.append(summary)
            all_p.append(p)
            all_clk.append(clk)
    p, clk = np.concatenate(all_p), np.concatenate(all_clk)
    return SimulationSummary(
        out_dir=out_dir,
        impressions=len(p),
        clicks=int(clk.sum()),
        ctr=float(clk.mean()),
        oracle_auc=roc_auc(p, clk),
        intercept=world.intercept,
        seconds=time.perf_counter() - started,
        days=days,
    )
