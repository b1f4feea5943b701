"""``deepclick towers --date D``: train the two-tower model on D's features and publish its towers.

The towers are published as one folder, ``<artifacts>/towers/<YYYYMMDD>/{user,context,time,ad}``
(one SavedModel each), so the embed job and serving's cold-start path load exactly the model that
was trained; the manifest records the features version, the settings and the training curve.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from deepclick import layout
from deepclick.layout import version_for
from deepclick.publish import (
    publishing,
    resolve,
)
from deepclick.settings import Settings
from models.feature_spec import load_feature_spec
from pipelines.training_days import TrainingDays, split_training_days


def features_folder(settings: Settings, date: dt.date) -> Path:
    """The published features of day D (built from the days before D)."""
    return resolve(layout.features_dir(settings.root), version_for(date), what="features")


def training_days(settings: Settings, train_dates: Sequence[str]) -> TrainingDays:
    """The split of D's training days between the towers and the ranker the settings ask for."""
    cfg = settings.lifecycle
    return split_training_days(train_dates, cfg.ranker_similarity, cfg.ranker_days)


def towers_folder(settings: Settings, date: dt.date) -> Path:
    return resolve(layout.towers_dir(settings.root), version_for(date), what="two-tower model")


def run_towers(settings: Settings, date: dt.date, *, progress: bool = True) -> Path:
    """Train on ``training/retrieval`` of D's features, export every tower, publish atomically.

    With ``lifecycle.ranker_similarity`` the towers leave out the window's last
    ``lifecycle.ranker_days`` days, which the ranker trains on (pipelines/training_days.py).
    """
    from models.two_tower import export_towers, train_two_tower

    source = features_folder(settings, date)
    spec = load_feature_spec(source)
    days = training_days(settings, spec.train_dates)
    trained = train_two_tower(spec, settings.two_tower, progress=progress, dates=days.towers)
    version = version_for(date)
    with publishing(layout.towers_dir(settings.root), version) as staging:
        export_towers(trained, staging.path)
        staging.manifest.update(
            {
                "inputs": {"features": spec.version},
                "train_dates": list(days.towers),
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
    return layout.towers_dir(settings.root) / version
