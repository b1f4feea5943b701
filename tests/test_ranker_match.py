"""The ranker's query x ad factor term (``ranker.match_dim``, issue 10): fitted after the wide
part on the wide part's rows, frozen before the network.

Planted folder (tests/feature_folder.py): a user of group ``g`` clicks an ad of category ``g``
far more often (``match_strength`` 3). A one-hot logistic regression cannot express that
product; a user-side vector summed with an ad-side vector can. The serving graph's parity with
the term is in ``tests/test_ranker_serving_graph.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from feature_folder import FeatureFolder, write_feature_folder

from deepclick.layout import version_for
from deepclick.settings import RankerSettings
from models.evaluation.ranking import auc
from models.ranker.export import export_ranker
from models.ranker.inputs import frame_to_inputs, rank_request, shared_inputs
from models.ranker.match import fit_match, match_layers, wide_and_match
from models.ranker.model import build_logit_model, match_sides
from models.ranker.predictor import InProcessPredictor
from models.ranker.train import TrainedRanker, _dataset, _tensors, predict, train_ranker
from models.ranker.wide import fit_wide, wide_layers

SETTINGS = RankerSettings(
    batch_size=256, epochs=1, cross_layers=1, baseline=False, match_dim=4, match_epochs=3
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(
        tmp_path_factory.mktemp("match"), users=400, ads=150, impressions_per_day=4000, seed=2
    )


def test_the_sides_are_the_query_roles_and_the_ad_role(folder: FeatureFolder) -> None:
    query, ad = match_sides(folder.spec)
    roles = {f.name: f.role for f in folder.spec.categorical}
    assert query and ad
    assert {roles[n] for n in query} == {"user", "context"}
    assert {roles[n] for n in ad} == {"ad"}
    assert sorted([*query, *ad]) == sorted(roles)
    model = build_logit_model(folder.spec, SETTINGS)
    # the user's own id is left out by default: the profile fields stand for the user
    assert sorted(layer.name for layer in match_layers(model)) == sorted(
        f"match__{n}" for n in [*query, *ad] if n != "user_id"
    )
    assert match_layers(build_logit_model(folder.spec, RankerSettings())) == []  # off: none


def test_the_match_fit_learns_the_planted_product_the_wide_part_cannot(
    folder: FeatureFolder,
) -> None:
    """After the wide solve, fitting the match vectors lowers the held-out loss and lifts the
    evaluation day's AUC; the wide weights stay as solved and the vectors end frozen."""
    rows = folder.table("training/ranking")
    labels = rows["label"].to_numpy()
    model = build_logit_model(folder.spec, SETTINGS, base_rate=float(labels.mean()))
    tensors = _tensors(model, frame_to_inputs(folder.spec, rows))
    fit_wide(model, tensors, labels, c=0.1, seed=7)
    tables, _ = wide_layers(model)
    solved = [t.get_weights()[0].copy() for t in tables]
    eval_rows = folder.table("eval")
    eval_inputs = _tensors(model, frame_to_inputs(folder.spec, eval_rows))
    eval_labels = eval_rows["label"].to_numpy()
    offset_model = wide_and_match(model)
    initial = [layer.get_weights() for layer in match_layers(model)]
    for layer in match_layers(model):  # the wide part alone
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    wide_auc = auc(eval_labels, predict(offset_model, eval_inputs))
    for layer, weights in zip(match_layers(model), initial, strict=True):
        layer.set_weights(weights)  # the small random start: all zeros has no gradient

    metrics = fit_match(
        model,
        _dataset(tensors, labels, 256, seed=7),
        epochs=3,
        learning_rate=0.01,
        held=(_dataset(eval_inputs, eval_labels, 4096, None), 0.0),
    )

    match_auc = auc(eval_labels, predict(offset_model, eval_inputs))
    # measured: wide part alone 0.594, with the match term 0.745 (0.738 with the user id in it)
    assert match_auc > wide_auc + 0.08, (wide_auc, match_auc)
    assert metrics["match_holdout_logloss"] < metrics["match_holdout_logloss_before"], metrics
    for table, before in zip(tables, solved, strict=True):
        np.testing.assert_array_equal(table.get_weights()[0], before)
    assert not any(layer.trainable for layer in match_layers(model))


@pytest.fixture(scope="module")
def trained(folder: FeatureFolder) -> TrainedRanker:
    return train_ranker(folder.spec, SETTINGS, progress=False)


def test_a_trained_ranker_keeps_the_match_vectors_the_fit_left(
    folder: FeatureFolder, trained: TrainedRanker
) -> None:
    """Through train_ranker: the fit's metrics are recorded and the network's epochs do not move
    the frozen vectors (a second fit from the same seed gives the same vectors)."""
    assert (
        trained.metrics["match_holdout_logloss"] < trained.metrics["match_holdout_logloss_before"]
    ), trained.metrics
    after_network = {
        layer.name: layer.get_weights()[0] for layer in match_layers(trained.logit_model)
    }
    again = train_ranker(folder.spec, SETTINGS.model_copy(update={"epochs": 2}), progress=False)
    for layer in match_layers(again.logit_model):
        np.testing.assert_allclose(layer.get_weights()[0], after_network[layer.name], atol=1e-6)


def test_the_exported_ranker_scores_the_match_term_in_every_signature(
    folder: FeatureFolder, trained: TrainedRanker, tmp_path: Path
) -> None:
    """The SavedModel's fused graph carries the match vectors: the reloaded model, its ``rank``
    signature (one user and context, many ads) and the XLA-compiled ``indexed`` path score as
    the trained Keras model."""
    exported = export_ranker(trained, tmp_path, "ranker", version_for(trained.spec.target_date))
    predictor = InProcessPredictor(exported)
    eval_rows = folder.table("eval")
    np.testing.assert_allclose(
        predictor.predict_frame(eval_rows), trained.predict(eval_rows), atol=1e-5
    )
    shared = shared_inputs(trained.spec)
    one_user = eval_rows.head(200).assign(**{n: eval_rows[n].iloc[0] for n in shared})
    request = rank_request(trained.inputs(one_user), shared)
    expected = trained.predict(one_user)
    assert expected.std() > 0.001  # the ads score differently
    for scorer in (predictor, InProcessPredictor(exported, xla=True)):
        np.testing.assert_allclose(scorer.predict(request, "rank"), expected, atol=1e-5)
