"""``deepclick towers --date D``: train the two-tower model on D's features and publish its towers.

The towers are published as one folder, ``<artifacts>/towers/<YYYYMMDD>/{user,context,time,ad}``
(one SavedModel each), so the embed job and serving's cold-start path load exactly the model that
was trained; the manifest records the features version, the settings and the training curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deepclick.publish import publishing
from deepclick.settings import Settings
from models.feature_spec import load_feature_spec
from pipelines.training_days import TrainingDays, split_training_days


def training_days(settings: Settings, train_dates: Sequence[str]) -> TrainingDays:
    """The split of D's training days between the towers and the ranker the settings ask for."""
    cfg = settings.lifecycle
    return split_training_days(
        train_dates, cfg.ranker_similarity, cfg.ranker_days, refit=cfg.refit_towers
    )


def run_towers(
    settings: Settings,
    features: Path,
    out: Path,
    *,
    served: bool = True,
    progress: bool = True,
) -> Path:
    """Train on ``training/retrieval`` of the ``features`` folder, export every tower and publish
    them atomically as ``out`` (``<parent>/<version>``, named by the caller); return ``out``.

    ``served``: the towers that are served, else those whose scores the ranker trains on
    (pipelines/training_days.py). They differ only with ``lifecycle.refit_towers``: the ranker's
    towers leave out the window's last ``lifecycle.ranker_days`` days, the served ones do not.
    """
    from models.two_tower import export_towers, train_two_tower

    spec = load_feature_spec(features)
    days = training_days(settings, spec.train_dates)
    dates = days.served if served else days.towers
    trained = train_two_tower(spec, settings.two_tower, progress=progress, dates=dates)
    with publishing(out.parent, out.name) as staging:
        export_towers(trained, staging.path)
        staging.manifest.update(
            {
                "inputs": {"features": spec.version},
                "train_dates": list(dates),
                "served": served,
                "training_days": days.describe(),
                "settings": settings.two_tower.model_dump(),
                "counts": {"examples": trained.examples},
                "metrics": {
                    "examples_per_second": trained.examples_per_second,
                    "train_seconds": trained.seconds,
                    "history": trained.history,
                },
                "roles": list(trained.roles),
                "dim": trained.dim,
            }
        )
    return out
