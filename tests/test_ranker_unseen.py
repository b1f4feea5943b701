"""Values the ranker's fit never saw as themselves (a new ad's id, pooled in an OOV index with the
rare ads; a vocabulary value absent from the fit rows) are served as the average value in the
wide part and the window FM (``models/ranker/unseen.py``); a user's OOV rows, which the rare
users trained and which new users resemble, stay as trained. Before, D's new ads were predicted
at 0.31-0.48 of their clicks in every generated world while the peers predicted 0.76-1.10
(docs/history/model-quality.md, session 20)."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from feature_folder import FeatureFolder, write_feature_folder

from deepclick.settings import RankerSettings
from models.ranker.fm import fm_tables
from models.ranker.model import WIDE_PREFIX
from models.ranker.train import TrainedRanker, train_ranker
from models.ranker.unseen import oov_indices, serve_unseen_as_mean, unseen_mean

SETTINGS = RankerSettings(
    batch_size=256, epochs=2, cross_layers=1, holdout="last_day", baseline=False, fm_blend=0.3
)


def test_oov_and_unseen_rows_become_the_row_weighted_mean_of_the_others() -> None:
    table = np.array([[9.0, 9.0], [7.0, 7.0], [1.0, 2.0], [3.0, 6.0]])
    served = unseen_mean(np.array([40, 0, 3, 1]), oov=1)  # row 0: OOV, trained on rare values
    got = served.apply(table)
    mean = (3 * table[2] + 1 * table[3]) / 4
    np.testing.assert_allclose(got[:2], [mean, mean])
    np.testing.assert_array_equal(got[2:], table[2:])
    np.testing.assert_array_equal(table[0], [9.0, 9.0])  # the input is left as it was
    np.testing.assert_allclose(unseen_mean(np.array([5, 0, 5])).apply(np.array([1.0, 8.0, 3.0])),
                               [1.0, 2.0, 3.0])  # fmt: skip


def test_only_the_named_features_oov_rows_become_the_mean() -> None:
    table = keras.layers.Embedding(4, 2)
    table.build((None,))
    rows = np.array([[9.0, 9.0], [1.0, 2.0], [7.0, 7.0], [3.0, 6.0]], dtype=np.float32)
    table.set_weights([rows])
    # row 0 is the OOV row the rare users trained (5 rows); row 2 was never trained
    replaced = serve_unseen_as_mean(None, {"user_id": table}, {"user_id": np.array([5, 3, 0, 1])})
    mean = (3 * rows[1] + 5 * rows[0] + 1 * rows[3]) / 9
    np.testing.assert_allclose(table.get_weights()[0], [rows[0], rows[1], mean, rows[3]], rtol=1e-6)
    assert replaced == 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(tmp_path_factory.mktemp("unseen_features"), new_ads=24, seed=3)


@pytest.fixture(scope="module")
def trained(folder: FeatureFolder) -> TrainedRanker:
    return train_ranker(folder.spec, SETTINGS, progress=False, dates=folder.spec.train_dates[-2:])


def _counts(model, feature: str, values: pd.Series, size: int) -> np.ndarray:
    index = np.asarray(model.get_layer(f"lookup__{feature}")(values.astype(str).to_numpy()))
    return np.bincount(index.reshape(-1), minlength=size)


def _own_mean(weights: np.ndarray, counts: np.ndarray, oov: int) -> np.ndarray:
    own = counts > 0
    own[:oov] = False
    return np.average(weights[own], axis=0, weights=counts[own])


def test_every_table_serves_an_unknown_ad_as_the_average_ad(
    trained: TrainedRanker, folder: FeatureFolder
) -> None:
    model = trained.logit_model
    oov = oov_indices(model, "ad_id")
    every_row = pd.read_parquet(folder.path / "training" / "ranking")

    # the window FM: every training day's rows, the held-out ones included
    (fm,) = fm_tables(model)["ad_id"].get_weights()
    counts = _counts(model, "ad_id", every_row["ad_id"], len(fm))
    np.testing.assert_allclose(fm[:oov], [_own_mean(fm, counts, oov)] * oov, rtol=1e-4, atol=1e-6)
    assert trained.metrics["fm_unseen_rows_as_mean"] >= oov

    # the wide part: every training day's fit rows (held-out rows left out)
    (wide,) = model.get_layer(f"{WIDE_PREFIX}ad_id").get_weights()
    fit_days = every_row[every_row["date"].astype(str) != trained.split.calibration_dates[-1]]
    counts = _counts(model, "ad_id", fit_days["ad_id"], len(wide))
    np.testing.assert_allclose(wide[:oov], [_own_mean(wide, counts, oov)] * oov, rtol=1e-4)

    # so an ad no vocabulary holds is scored as one with the average ad's weights
    eval_rows = folder.table("eval")
    new = eval_rows[eval_rows["ad_id"].isin(folder.truth.new_ads)]
    assert len(new) > 0
    renamed = new.assign(ad_id="never-seen-ad")
    np.testing.assert_allclose(trained.predict(new), trained.predict(renamed), rtol=1e-5)
