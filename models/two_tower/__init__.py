"""The two-tower retrieval model (DESIGN.md, "models: two-tower").

Query = user tower + context tower (+ a small request-time tower folded into the context vector
on export), candidate = ad tower, score = query · ad. Modules, in the order data flows:
``preprocessing`` (spec → encoders), ``towers`` (one tower per role), ``model`` (the in-batch
softmax with logQ correction), ``train`` (features folder → :class:`TrainedTowers`), ``export``
(one SavedModel per tower, :func:`load_tower`), ``evaluate`` (recall@K against popularity).
"""

from models.two_tower.evaluate import click_recall
from models.two_tower.export import LoadedTower, export_towers, load_tower
from models.two_tower.train import TrainedTowers, train_two_tower

__all__ = [
    "LoadedTower",
    "TrainedTowers",
    "click_recall",
    "export_towers",
    "load_tower",
    "train_two_tower",
]
