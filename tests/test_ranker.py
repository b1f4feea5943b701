"""The CTR ranker end to end on a planted features folder: it learns the planted interaction, is
calibrated, exports atomically as a two-signature SavedModel with warmup records, reloads to the
same predictions, and the evaluation report refuses what it cannot measure.

The planted signal (tests/feature_folder.py): a user clicks ads of their own group's category far
more often. That is a user-feature × ad-feature interaction, which a logistic regression over single
features cannot express and a DCN-v2 cross can.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feature_folder import FeatureFolder, PlantedTruth, write_feature_folder

from deepclick.layout import version_for
from deepclick.settings import RankerSettings
from models.evaluation.ranking import (
    EmptyEvaluationError,
    SingleClassError,
    auc,
    calibration_interval,
)
from models.evaluation.ranking import calibration_ratio as ratio
from models.evaluation.report import VersionMismatchError, evaluate_ranking
from models.ranker import export as export_module
from models.ranker import train as train_module
from models.ranker.export import RankerExportError, export_ranker, read_warmup
from models.ranker.inputs import CANDIDATE_INDEX, SIMILARITY_INPUTS, rank_request, shared_inputs
from models.ranker.predictor import RANKER_MANIFEST, InProcessPredictor, PredictorInputError
from models.ranker.train import (
    MIN_NEGATIVE_RATE,
    RankerTrainingError,
    TrainedRanker,
    downsample_negatives,
    early_stopping,
    fit_row_counts,
    load_split,
    memory_bounded_rate,
    on_served_scores,
    split_for_calibration,
    train_ranker,
)

SETTINGS = RankerSettings(batch_size=256, epochs=4, cross_layers=1, dropout=0.3, holdout="last_day")
"""Sized for ~20k training rows: more steps than the defaults (which suit millions of rows);
calibrated on the last training day, whose semantics these tests check."""
MODEL = "ranker"


class PlantedSimilarity:
    """What a good two-tower would score: user·ad is 1 when the user's group is the ad's category
    (0 otherwise, and for unknown ids); context·ad carries no signal."""

    def __init__(self, truth: PlantedTruth, version: str = "20240103") -> None:
        self.truth = truth
        self._version = version

    @property
    def version(self) -> str:
        return self._version

    def scores(
        self, user_ids: np.ndarray, placement_ids: np.ndarray, ad_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        groups = np.array([self.truth.user_group.get(u, -1) for u in user_ids])
        categories = np.array([self.truth.ad_category.get(a, -2) for a in ad_ids])
        return (groups == categories).astype(np.float32), np.zeros(len(ad_ids), np.float32)


class RescaledSimilarity:
    """Another towers fit's scores: the same ordering on another scale (``scale·s + shift``),
    as towers trained on more days score (lifecycle.refit_towers)."""

    def __init__(self, inner: PlantedSimilarity, scale: float, shift: float) -> None:
        self.inner, self.scale, self.shift = inner, scale, shift
        self.version = inner.version

    def scores(self, user_ids, placement_ids, ad_ids) -> tuple[np.ndarray, np.ndarray]:
        user_ad, context_ad = self.inner.scores(user_ids, placement_ids, ad_ids)
        return self.scale * user_ad + self.shift, self.scale * context_ad + self.shift


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> FeatureFolder:
    return write_feature_folder(tmp_path_factory.mktemp("features"), seed=0)


@pytest.fixture(scope="module")
def eval_rows(folder: FeatureFolder) -> pd.DataFrame:
    return folder.table("eval")


@pytest.fixture(scope="module")
def trained(folder: FeatureFolder) -> TrainedRanker:
    return train_ranker(folder.spec, SETTINGS, progress=False)


@pytest.fixture(scope="module")
def sampled(folder: FeatureFolder) -> TrainedRanker:
    """Negatives kept at 25 %, and the two-tower scores as inputs."""
    settings = SETTINGS.model_copy(update={"negative_sampling_rate": 0.25, "baseline": False})
    return train_ranker(
        folder.spec, settings, similarity=PlantedSimilarity(folder.truth), progress=False
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_repository")


@pytest.fixture(scope="module")
def exported(trained: TrainedRanker, repository: Path) -> Path:
    version = version_for(trained.spec.target_date)
    return export_ranker(trained, repository, MODEL, version, {"mlflow_run_id": "run-1"})


@pytest.fixture(scope="module")
def predictor(exported: Path) -> InProcessPredictor:
    return InProcessPredictor(exported)


# --- learning and calibration -------------------------------------------------------------------


def test_learns_the_planted_interaction_lr_cannot_express(
    trained: TrainedRanker, folder: FeatureFolder, eval_rows: pd.DataFrame
) -> None:
    labels = eval_rows["label"].to_numpy()
    ranker_auc = auc(labels, trained.predict(eval_rows))
    lr_auc = auc(labels, trained.baseline.predict(eval_rows))
    oracle_auc = auc(labels, folder.truth.eval_p_click)
    assert ranker_auc > 0.72, (ranker_auc, lr_auc, oracle_auc)
    assert ranker_auc > lr_auc + 0.1, (ranker_auc, lr_auc)
    assert ranker_auc < oracle_auc + 0.01  # sanity: no model beats the truth


def test_calibrated_on_the_held_out_evaluation_day(
    trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    assert trained.split.calibration_dates == (trained.spec.train_dates[-1],)
    assert trained.spec.target_date not in trained.split.fit_dates
    assert 0.9 <= ratio(eval_rows["label"], trained.predict(eval_rows)) <= 1.1


def test_negative_sampling_correction_restores_calibration(
    sampled: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    m = sampled.metrics
    assert m["fit_rows"] == len(sampled.split.fit)
    assert m["negative_sampling_rate"] == 0.25
    assert m["fit_rows"] < 0.5 * sampled.split.fit_rows_before_sampling
    # Keeping 1 negative in 4 inflates the predicted odds ~4x; log(0.25) takes that back out (the
    # exact arithmetic is tested on a logistic model in test_ranker_layers.py); the network's own
    # residual bias on a new day is what the Platt map then removes.
    assert m["holdout_calibration_ratio_uncorrected"] > 2.0, m
    assert abs(m["holdout_calibration_ratio_corrected"] - 1) < 0.2, m
    # calibrated within what D's click count can tell (300-odd clicks: about ±11 %)
    low, high = calibration_interval(eval_rows["label"], sampled.predict(eval_rows))
    assert low <= 1.0 <= high, (low, high)


def test_similarity_scores_are_inputs_when_given(
    sampled: TrainedRanker, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    assert set(SIMILARITY_INPUTS) <= set(sampled.input_names)
    assert not set(SIMILARITY_INPUTS) & set(trained.input_names)
    assert auc(eval_rows["label"], sampled.predict(eval_rows)) > 0.75


def test_served_scores_on_another_scale_are_read_on_the_trained_one(
    sampled: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    """Served towers refitted on more days score on a wider scale than those the ranker
    standardised in training; read raw, their scores sit at the clip and the ranker
    over-predicts (TalkingData: calibration 1.13 -> 1.38). Standardised by their own statistics
    on the ranker's fit rows, the same ordering reaches the network as in training."""
    served = RescaledSimilarity(sampled.similarity, scale=5.0, shift=2.0)
    reread = on_served_scores(sampled, served)
    assert reread.similarity is served
    np.testing.assert_allclose(reread.predict(eval_rows), sampled.predict(eval_rows), atol=1e-5)
    raw = replace(sampled, similarity=served).predict(eval_rows)
    assert np.abs(raw - sampled.predict(eval_rows)).max() > 0.01  # what it fixes


def test_one_training_day_holds_out_a_seeded_share_for_calibration() -> None:
    rows = pd.DataFrame(
        {"event_id": [f"e{i}" for i in range(10_000)], "date": "2024-01-01", "label": 0}
    )
    split = split_for_calibration(rows, SETTINGS)
    assert len(split.calibration) == pytest.approx(1000, abs=100)  # calibration_fraction 0.1
    assert not set(split.fit["event_id"]) & set(split.calibration["event_id"])
    shuffled = split_for_calibration(rows.sample(frac=1, random_state=1), SETTINGS)
    assert set(shuffled.calibration["event_id"]) == set(split.calibration["event_id"])


def test_holdout_fraction_draws_the_held_out_rows_from_every_day() -> None:
    # holdout "fraction": the fit keeps ~90% of both days (not only the first), so the ranker
    # learns from every day it is given; "last_day" holds the whole second day out.
    rows = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(10_000)],
            "date": ["2024-01-01"] * 5000 + ["2024-01-02"] * 5000,
            "label": 0,
        }
    )
    split = split_for_calibration(rows, SETTINGS.model_copy(update={"holdout": "fraction"}))
    assert split.fit_dates == split.calibration_dates == ("2024-01-01", "2024-01-02")
    held = split.calibration["date"].value_counts()
    assert held["2024-01-01"] == pytest.approx(500, abs=60)
    assert held["2024-01-02"] == pytest.approx(500, abs=60)
    assert not set(split.fit["event_id"]) & set(split.calibration["event_id"])
    last_day = split_for_calibration(rows, SETTINGS)
    assert set(last_day.calibration["date"]) == {"2024-01-02"} and len(last_day.fit) == 5000


def test_early_stopping_watches_held_out_auc_and_keeps_the_best_epoch() -> None:
    assert early_stopping(SETTINGS) == []  # patience 0: every epoch is trained
    (callback,) = early_stopping(SETTINGS.model_copy(update={"early_stopping_patience": 2}))
    assert (callback.monitor, callback.patience, callback.restore_best_weights) == (
        "val_auc",
        2,
        True,
    )


def test_the_memory_bound_samples_negatives_only_when_the_rows_exceed_it() -> None:
    """1M fit rows with 20k clicks under a 200k bound keep every click and 180k of the 980k
    negatives; rows that fit keep the configured rate, which the bound never raises; clicks
    beyond the bound leave the floor rate."""
    assert memory_bounded_rate(1_000_000, 20_000, 1.0, 200_000) == pytest.approx(180 / 980)
    assert memory_bounded_rate(150_000, 3_000, 1.0, 200_000) == 1.0
    assert memory_bounded_rate(1_000_000, 20_000, 0.1, 200_000) == 0.1
    assert memory_bounded_rate(1_000_000, 300_000, 1.0, 200_000) == MIN_NEGATIVE_RATE
    assert memory_bounded_rate(5_000, 5_000, 1.0, 1_000) == 1.0  # no negatives to drop


def test_a_window_beyond_max_fit_rows_trains_on_sampled_negatives(folder: FeatureFolder) -> None:
    """The bound counts the rows the fit would read (those of the split), and a window holding
    more than ``max_fit_rows`` trains on every click plus the share of negatives that fills the
    bound: the rate is recorded with the model (export manifest settings) and corrected."""
    split = load_split(folder.spec, SETTINGS)
    rows, clicks = fit_row_counts(folder.spec, SETTINGS)
    assert (rows, clicks) == (len(split.fit), int(split.fit["label"].sum()))
    cap = clicks + (rows - clicks) // 3
    settings = SETTINGS.model_copy(update={"max_fit_rows": cap, "epochs": 1, "baseline": False})
    trained = train_ranker(folder.spec, settings, progress=False)
    rate = trained.metrics["negative_sampling_rate"]
    assert rate == pytest.approx(1 / 3, abs=0.001)
    assert trained.settings.negative_sampling_rate == rate  # what the export records
    assert int(trained.split.fit["label"].sum()) == clicks  # every click kept
    assert abs(len(trained.split.fit) - cap) < 0.05 * cap


def test_downsampling_keeps_every_click_and_a_share_of_the_rest() -> None:
    rows = pd.DataFrame(
        {"event_id": [f"e{i}" for i in range(20_000)], "label": [1, 0, 0, 0] * 5000}
    )
    kept = downsample_negatives(rows, 0.25, seed=7)
    assert kept["label"].sum() == 5000
    assert (kept["label"] == 0).sum() == pytest.approx(15_000 * 0.25, rel=0.05)
    assert kept.equals(downsample_negatives(rows, 0.25, seed=7))


def test_reading_in_batches_splits_and_samples_as_the_whole_table_would(
    folder: FeatureFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SETTINGS.model_copy(update={"negative_sampling_rate": 0.25})
    whole = folder.table("training/ranking")
    whole["date"] = pd.to_datetime(whole["date"]).dt.strftime("%Y-%m-%d")
    expected = split_for_calibration(whole, settings)
    expected_fit = downsample_negatives(expected.fit, 0.25, settings.seed)
    monkeypatch.setattr(train_module, "READ_BATCH_ROWS", 997)  # batches cut across days
    split = load_split(folder.spec, settings)
    assert split.fit_dates == expected.fit_dates
    assert split.calibration_dates == expected.calibration_dates
    assert split.fit_rows_before_sampling == len(expected.fit)
    key = ["date", "event_id"]
    assert split.fit[key].equals(expected_fit.sort_values(key, ignore_index=True)[key])
    assert split.calibration[key].equals(
        expected.calibration.sort_values(key, ignore_index=True)[key]
    )


def test_training_on_chosen_days_reads_only_their_rows(folder: FeatureFolder) -> None:
    first, *_, last = folder.spec.train_dates
    split = load_split(folder.spec, SETTINGS, dates=[first, last])
    assert split.fit_dates == (first,) and split.calibration_dates == (last,)
    assert set(split.fit["date"]) == {first} and set(split.calibration["date"]) == {last}
    with pytest.raises(RankerTrainingError, match="has no rows on 1999-01-01"):
        load_split(folder.spec, SETTINGS, dates=["1999-01-01"])


# --- export -------------------------------------------------------------------------------------


def _common_request(frame: pd.DataFrame, shared: list[str], n: int) -> pd.DataFrame:
    """``n`` candidates (the first rows' ads) all shown to the first row's user and placement."""
    candidates = frame.head(n).copy()
    for name in shared:
        candidates[name] = frame[name].iloc[0]
    return candidates


def signature_scorer(exported: Path):
    """``pctr`` of a signature of the SavedModel at ``exported``, called directly (strings as
    strings, everything else float32): the public answer the predictor's paths must equal."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported))

    def direct(signature: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {
            k: tf.constant(v, dtype=tf.string if v.dtype.kind in "OSU" else tf.float32)
            for k, v in inputs.items()
        }
        return loaded.signatures[signature](**feeds)["pctr"].numpy()

    return direct


def test_reloaded_model_matches_in_memory_predictions(
    predictor: InProcessPredictor, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    np.testing.assert_allclose(
        predictor.predict_frame(eval_rows), trained.predict(eval_rows), atol=1e-5
    )


def test_rank_signature_agrees_with_serving_default(
    predictor: InProcessPredictor, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    shared = shared_inputs(trained.spec)
    assert sorted(predictor.shared_inputs) == sorted(shared)
    candidates = _common_request(eval_rows, shared, 300)
    per_row = trained.inputs(candidates)
    ranked = predictor.predict(rank_request(per_row, shared), signature="rank")
    assert ranked.shape == (300,)
    np.testing.assert_allclose(ranked, predictor.predict(per_row), atol=1e-6)
    np.testing.assert_allclose(ranked, trained.predict(candidates), atol=1e-5)


def test_version_folder_is_an_integer_and_complete(exported: Path, repository: Path) -> None:
    assert exported.parent == repository / MODEL
    assert exported.name.isdigit()
    assert [p.name for p in (repository / MODEL).iterdir() if p.is_dir()] == [exported.name]
    for part in ("saved_model.pb", "variables", RANKER_MANIFEST, export_module.WARMUP_FILE):
        assert (exported / part).exists(), part


def test_manifest_pairs_the_model_with_its_inputs(
    predictor: InProcessPredictor, trained: TrainedRanker
) -> None:
    manifest = predictor.manifest
    assert manifest["feature_spec_version"] == trained.spec.version
    assert manifest["embedding_version"] is None  # trained without similarity scores
    assert manifest["mlflow_run_id"] == "run-1"
    assert set(manifest["signatures"]) == {"serving_default", "rank"}
    assert manifest["signatures"]["rank"]["inputs"]["user_id"]["shape"] == [1]
    assert manifest["signatures"]["rank"]["inputs"]["ad_id"]["shape"] == [-1]
    assert manifest["checks"]["max_abs_difference"]["rank"] < 1e-4


def test_warmup_records_are_prediction_logs_for_both_signatures(
    exported: Path, predictor: InProcessPredictor
) -> None:
    records = read_warmup(exported)
    signatures = [r.predict_log.request.model_spec.signature_name for r in records]
    assert set(signatures) == {"serving_default", "rank"}
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == MODEL
        assert set(request.inputs) == set(predictor.input_names(request.model_spec.signature_name))
    rank = next(r for r in records if r.predict_log.request.model_spec.signature_name == "rank")
    dims = rank.predict_log.request.inputs["user_id"].tensor_shape.dim
    assert [d.size for d in dims] == [1]


def test_failed_export_leaves_no_version_behind(
    trained: TrainedRanker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full while writing warmup")

    monkeypatch.setattr(export_module, "write_warmup", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_ranker(trained, tmp_path, MODEL, "20240104")
    assert list((tmp_path / MODEL).iterdir()) == []  # no version, no staging folder


def test_export_that_does_not_reload_identically_is_not_published(
    trained: TrainedRanker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "CHECK_TOLERANCE", -1.0)  # any difference now fails
    with pytest.raises(RankerExportError, match="differs from the trained model"):
        export_ranker(trained, tmp_path, MODEL, "20240104")
    assert list((tmp_path / MODEL).iterdir()) == []


def test_version_must_be_an_integer(trained: TrainedRanker, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        export_ranker(trained, tmp_path, MODEL, "2024-01-04")


def test_similarity_inputs_are_signature_inputs(
    sampled: TrainedRanker, folder: FeatureFolder, eval_rows: pd.DataFrame, tmp_path: Path
) -> None:
    path = export_ranker(sampled, tmp_path, MODEL, "20240104")
    loaded = InProcessPredictor(path)
    assert loaded.embedding_version == "20240103"
    assert set(SIMILARITY_INPUTS) <= set(loaded.candidate_inputs)
    provider = PlantedSimilarity(folder.truth)
    np.testing.assert_allclose(
        loaded.predict_frame(eval_rows, similarity=provider), sampled.predict(eval_rows), atol=1e-5
    )
    with pytest.raises(PredictorInputError, match="pass a similarity provider"):
        loaded.predict_frame(eval_rows)
    with pytest.raises(VersionMismatchError, match=r"embeddings 20240103 .* embeddings 20990101"):
        evaluate_ranking(
            path,
            folder.path,
            tmp_path / "report",
            similarity=PlantedSimilarity(folder.truth, version="20990101"),
        )


def test_predictor_names_what_is_wrong_with_a_request(
    predictor: InProcessPredictor, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    shared = shared_inputs(trained.spec)
    request = rank_request(trained.inputs(_common_request(eval_rows, shared, 5)), shared)
    with pytest.raises(PredictorInputError, match=r"lacks input.*ad_id"):
        predictor.predict({k: v for k, v in request.items() if k != "ad_id"}, signature="rank")
    with pytest.raises(PredictorInputError, match="user_id is sent once per request"):
        predictor.predict({**request, "user_id": ["u1", "u2"]}, signature="rank")
    with pytest.raises(PredictorInputError, match="ad__price is numeric"):
        predictor.predict({**request, "ad__price": ["cheap"] * 5}, signature="rank")
    with pytest.raises(PredictorInputError, match="differ in length"):
        predictor.predict({**request, "ad_id": request["ad_id"][:2]}, signature="rank")


def test_packed_signature_scores_equal_rank_and_serving_default_on_the_same_saved_model(
    predictor: InProcessPredictor, exported: Path, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    """Issue 14: the in-process predictor calls the fused graph through ``packed`` (four
    arrays per call instead of one per input); its scores equal the public signatures called
    directly on the same SavedModel, for one request (``rank``) and for rows of many users
    (``serving_default``, the micro-batcher's form)."""

    assert predictor.packed
    groups = predictor.manifest["packed"]
    assert set(groups) == {"shared_strings", "shared_numbers", "candidate_strings",
                           "candidate_numbers"}  # fmt: skip
    assert sorted(n for names in groups.values() for n in names) == sorted(
        predictor.input_names("rank")
    )
    direct = signature_scorer(exported)

    shared = shared_inputs(trained.spec)
    request = rank_request(trained.inputs(_common_request(eval_rows, shared, 300)), shared)
    np.testing.assert_allclose(
        predictor.predict(request, "rank"), direct("rank", request), rtol=0, atol=1e-5
    )
    rows = trained.inputs(eval_rows.head(300))
    assert len(set(rows["user_id"])) > 10
    scores = predictor.predict(rows)
    assert scores.std() > 0.005  # rows that differ score differently
    np.testing.assert_allclose(scores, direct("serving_default", rows), rtol=0, atol=1e-5)
    assert predictor.manifest["checks"]["max_abs_difference"]["packed"] < 1e-4


def test_indexed_and_xla_calls_score_as_the_rank_signature_including_oov_ads_and_padding(
    predictor: InProcessPredictor, exported: Path, trained: TrainedRanker, eval_rows: pd.DataFrame
) -> None:
    """Issue 14: the in-process predictor looks strings up apart (shared values remembered, ad
    rows precomputable) and scores through the numeric ``indexed`` signature, XLA-compiled on
    rows padded to a bucket; every way gives the public ``rank`` / ``serving_default`` scores
    of the same SavedModel, also for ads whose values the vocabularies never saw."""

    assert (
        predictor.indexed and predictor.manifest["checks"]["max_abs_difference"]["indexed"] < 1e-4
    )
    index = predictor.manifest["indexed"]
    assert sorted(index["candidate_index"]) == sorted(
        predictor.manifest["packed"]["candidate_strings"]
    )
    direct = signature_scorer(exported)

    shared = shared_inputs(trained.spec)
    request = rank_request(trained.inputs(_common_request(eval_rows, shared, 300)), shared)
    request["ad__brand"] = request["ad__brand"].astype(object)
    request["ad__brand"][:7] = "a brand never seen"  # out of vocabulary: the OOV rows
    request["ad_id"] = request["ad_id"].astype(object)
    request["ad_id"][7:9] = "an ad never seen"
    expected = direct("rank", request)
    oov = predictor.candidate_index(request)
    known = predictor.candidate_index({k: v[20:] for k, v in request.items() if k not in shared})
    np.testing.assert_array_equal(oov[20:], known)  # a row depends on its ad's values only
    assert (oov[:7] != oov[10:17]).any()  # the OOV brand has a row of its own
    xla = InProcessPredictor(exported, xla=True)
    assert xla.compile((1, 300)) == [64, 128, 256, 512]  # 300 candidates: padded to 512
    for scorer in (predictor, xla):
        for given in ({}, {CANDIDATE_INDEX: oov}):  # strings looked up, or the rows given
            got = scorer.predict({**request, **given}, "rank")
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    rows = trained.inputs(eval_rows.head(100))  # 100 users' rows, as the micro-batcher sends
    expected = direct("serving_default", rows)
    for scorer in (predictor, xla):
        for _ in range(2):  # looked up, then every shared value remembered
            np.testing.assert_allclose(scorer.predict(rows), expected, rtol=0, atol=1e-5)
    with pytest.raises(PredictorInputError, match="candidate_index has shape"):
        predictor.predict({**request, CANDIDATE_INDEX: oov[:5]}, "rank")


# --- evaluation report --------------------------------------------------------------------------


def test_report_writes_metrics_markdown_and_plots(
    exported: Path, trained: TrainedRanker, folder: FeatureFolder, tmp_path: Path
) -> None:
    report = evaluate_ranking(
        exported.parent,  # the model folder: its CURRENT version is taken
        folder.path,
        tmp_path / "report",
        truth=folder.truth.eval_p_click,
        baselines={"logistic_regression": trained.baseline.predict},
        bootstrap=50,
    )
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["models"]["ranker"]["auc"] == pytest.approx(report.auc)
    assert saved["gaps"]["logistic_regression"]["auc"] > 0.1
    # the best peer keeps its own AUC; the ranker's difference to it sits apart (regression)
    best = saved["best_peer"]
    assert best["auc"] == pytest.approx(saved["models"]["logistic_regression"]["auc"])
    assert best["auc_difference"] == pytest.approx(saved["gaps"]["logistic_regression"]["auc"])
    assert best["auc_difference_ci95"][0] < best["auc_difference"] < best["auc_difference_ci95"][1]
    assert "not worse than** the best peer" in (tmp_path / "report" / "report.md").read_text()
    assert saved["oracle"]["auc"] > report.auc
    low, high = saved["models"]["ranker"]["auc_ci95"]
    assert low < report.auc < high
    assert (
        len(saved["models"]["ranker"]["per_placement"])
        == folder.spec.feature("placement_id").vocabulary_size
    )
    for name in ("report.md", "roc.png", "reliability.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| ranker |" in (tmp_path / "report" / "report.md").read_text()


def test_report_refuses_an_empty_day(
    predictor: InProcessPredictor, folder: FeatureFolder, eval_rows: pd.DataFrame, tmp_path: Path
) -> None:
    with pytest.raises(EmptyEvaluationError, match="has no rows"):
        evaluate_ranking(predictor, eval_rows.iloc[:0], tmp_path, feature_spec=folder.spec)


def test_report_refuses_a_single_class_day(
    predictor: InProcessPredictor, folder: FeatureFolder, eval_rows: pd.DataFrame, tmp_path: Path
) -> None:
    no_clicks = eval_rows.assign(label=0)
    with pytest.raises(SingleClassError, match=r"all \d+ impressions are non-clicks.*AUC"):
        evaluate_ranking(predictor, no_clicks, tmp_path, feature_spec=folder.spec)


def test_report_refuses_a_feature_spec_version_mismatch(
    predictor: InProcessPredictor, folder: FeatureFolder, eval_rows: pd.DataFrame, tmp_path: Path
) -> None:
    other = replace(folder.spec, version="20990101")
    with pytest.raises(
        VersionMismatchError, match=r"feature spec 20240104 .* feature spec 20990101"
    ):
        evaluate_ranking(predictor, eval_rows, tmp_path, feature_spec=other)
    report = evaluate_ranking(
        predictor,
        eval_rows,
        tmp_path / "backtest",
        feature_spec=other,
        allow_version_mismatch=True,
        bootstrap=0,
    )
    assert "20990101" in report.metrics["notes"][0]
