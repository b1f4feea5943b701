"""The generated ad marketplace (``deepclick simulate``): raw logs with known ground truth.

``run_simulate`` writes the taobao-like day folders of docs/contracts.md section 1; evaluation
reads the truth back with ``load_world`` and asks ``true_click_probability`` / ``best_ads``.
"""

from pipelines.simulate.impressions import LoggingPolicy, make_world
from pipelines.simulate.run import DaySummary, SimulationSummary, roc_auc, run_simulate
from pipelines.simulate.world import (
    World,
    best_ads,
    build_world,
    index_of,
    live_ads,
    live_placements,
    true_click_probability,
    true_logit,
)
from pipelines.simulate.writer import load_world, save_world

__all__ = [
    "DaySummary",
    "LoggingPolicy",
    "SimulationSummary",
    "World",
    "best_ads",
    "build_world",
    "index_of",
    "live_ads",
    "live_placements",
    "load_world",
    "make_world",
    "roc_auc",
    "run_simulate",
    "save_world",
    "true_click_probability",
    "true_logit",
]
