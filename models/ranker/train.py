"""Training the CTR ranker from a published features folder (DESIGN.md, "models: ranker").

The features folder of target day D holds ``training/ranking`` (every impression of the days before
D); day D itself is the evaluation day and is never read here (DESIGN.md, "Time"). Inside the
training days the last day is held out: the network trains on the earlier days and the calibration
head is fitted on the held-out day, so calibration sees rows the network did not and is itself
fitted before the evaluation day. With a single training day a seeded random share
(``calibration_fraction``) is held out instead.

Negatives may be down-sampled (``negative_sampling_rate``) to train faster on large days; the
matching correction ``logit += log(rate)`` is part of the calibration head.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import keras
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import tensorflow as tf

from deepclick.errors import DeepclickError
from deepclick.settings import RankerSettings
from models.evaluation.ranking import auc, calibration_ratio, logloss
from models.feature_spec import ROLE_KEY, FeatureSpec
from models.fitting import build_before_fit, shuffled_batches
from models.ranker.baselines import LogisticBaseline, train_baseline
from models.ranker.calibration import fit_calibration, sampling_correction
from models.ranker.fm import (
    BLEND,
    FM_LOGIT,
    blend_level,
    fm_tables,
    fm_trainer,
    has_fm,
    uses_fm,
)
from models.ranker.inputs import (
    SIMILARITY_INPUTS,
    NumericStats,
    SimilarityProvider,
    frame_to_inputs,
)
from models.ranker.layers import CalibrationHead
from models.ranker.model import build_logit_model, head_config, network_model, with_calibration
from models.ranker.unseen import serve_unseen_as_mean
from models.ranker.wide import fit_wide, random_effects, random_slopes, slopes_log_evidence

log = logging.getLogger(__name__)

RANKING_TABLE = "training/ranking"
PREDICT_BATCH = 8192
READ_BATCH_ROWS = 262_144


class RankerTrainingError(DeepclickError, ValueError):
    """The features folder cannot train a ranker (no rows, one class, ...); the message says why."""


@dataclass(frozen=True)
class Split:
    """Rows the network trains on and rows the calibration is fitted on."""

    fit: pd.DataFrame
    calibration: pd.DataFrame
    fit_dates: tuple[str, ...]
    calibration_dates: tuple[str, ...]
    how: str
    fit_rows_before_sampling: int | None = None
    """Training rows before negatives were down-sampled (``None``: ``fit`` was not sampled)."""

    def describe(self) -> dict[str, Any]:
        return {
            "how": self.how,
            "fit_dates": list(self.fit_dates),
            "calibration_dates": list(self.calibration_dates),
            "fit_rows": len(self.fit),
            "fit_rows_before_sampling": self.fit_rows_before_sampling,
            "calibration_rows": len(self.calibration),
        }


@dataclass
class TrainedRanker:
    """A trained, calibrated ranker and everything its export and evaluation need.

    ``model`` maps the raw input dict to the calibrated ``pctr`` (it is what gets exported);
    ``logit_model`` shares its layers and stops before the calibration head.
    """

    spec: FeatureSpec
    settings: RankerSettings
    model: keras.Model
    logit_model: keras.Model
    head: CalibrationHead
    split: Split
    similarity: SimilarityProvider | None = None
    baseline: LogisticBaseline | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def uses_similarity(self) -> bool:
        return self.similarity is not None

    @property
    def input_names(self) -> list[str]:
        return list(self.model.input.keys())

    @property
    def embedding_version(self) -> str | None:
        return None if self.similarity is None else str(self.similarity.version)

    @property
    def calibration(self) -> dict[str, Any]:
        return head_config(self.head)

    def inputs(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The raw input dict of ``frame``'s rows, similarity scores included when used."""
        return frame_to_inputs(self.spec, frame, similarity=self.similarity)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated click probabilities of ``frame``'s rows (the exported model's output)."""
        return predict(self.model, self.inputs(frame))

    def predict_logits(self, frame: pd.DataFrame) -> np.ndarray:
        """The network's raw logits, before correction and calibration."""
        return predict(self.logit_model, self.inputs(frame))


def predict(
    model: keras.Model, inputs: dict[str, np.ndarray], batch: int = PREDICT_BATCH
) -> np.ndarray:
    """Run ``model`` over an input dict in batches; returns a flat float array."""
    n = len(next(iter(inputs.values()))) if inputs else 0
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(_tensors(model, inputs)).batch(batch)
    return np.concatenate([np.asarray(model(b, training=False)).reshape(-1) for b in dataset])


def _tensors(model: keras.Model, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Only the model's inputs, as tensors of their declared dtype."""
    out: dict[str, Any] = {}
    for name, spec in model.input.items():
        values = inputs[name]
        out[name] = tf.constant(values, dtype=tf.string if spec.dtype == "string" else tf.float32)
    return out


def _date_filter(dates: Sequence[str] | None) -> pc.Expression | None:
    if dates is None:
        return None
    return ds.field("date").isin([dt.date.fromisoformat(d) for d in dates])


def iter_ranking_rows(
    spec: FeatureSpec, dates: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """``training/ranking`` of the spec's folder (only the rows of ``dates``, when given) in
    record batches, ``date`` as ``YYYY-MM-DD``.

    Batches, not one frame: a 30-day window of a large marketplace does not fit in memory as
    pandas, and the rows the network trains on (negatives down-sampled) are a fraction of it.
    """
    path = spec.table_path(RANKING_TABLE)
    if not path.exists():
        raise RankerTrainingError(f"{path} does not exist: is {spec.folder} a features folder?")
    dataset = ds.dataset(path, format="parquet")
    for batch in dataset.to_batches(batch_size=READ_BATCH_ROWS, filter=_date_filter(dates)):
        if batch.num_rows == 0:
            continue
        frame = batch.to_pandas()
        frame["date"] = pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d")
        yield frame


def ranking_dates(spec: FeatureSpec, dates: Sequence[str] | None = None) -> tuple[str, ...]:
    """The days present in ``training/ranking`` (of ``dates``, when given; reads ``date`` only)."""
    path = spec.table_path(RANKING_TABLE)
    if not path.exists():
        raise RankerTrainingError(f"{path} does not exist: is {spec.folder} a features folder?")
    table = ds.dataset(path, format="parquet").to_table(
        columns=["date"], filter=_date_filter(dates)
    )
    dates = pc.unique(table["date"])
    return tuple(sorted(pd.to_datetime(dates.to_pandas()).dt.strftime("%Y-%m-%d")))


def _stable_fraction(ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id that depends on the id and seed only (not on row order,
    process or machine), for reproducible random splits."""
    salted = ids.astype(str).radd(f"{seed}:")
    hashed = pd.util.hash_array(salted.to_numpy(dtype=object), hash_key=_hash_key(seed))
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _hash_key(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()[:16]


def split_for_calibration(
    frame: pd.DataFrame, settings: RankerSettings, dates: Sequence[str] | None = None
) -> Split:
    """Hold out the last training day for calibration and early stopping (``holdout``
    ``last_day``), or a seeded random share of every day (``fraction``, and always with one day).

    ``dates`` are the days of the whole training table when ``frame`` is one batch of it
    (default: the days of ``frame``), so that every batch is split the same way.
    """
    dates = tuple(sorted(frame["date"].unique() if dates is None else dates))
    if len(dates) >= 2 and settings.holdout == "last_day":
        last = frame["date"] == dates[-1]
        return Split(frame[~last], frame[last], dates[:-1], dates[-1:], "last training day")
    held = _stable_fraction(frame["event_id"], settings.seed) < settings.calibration_fraction
    why = "one training day" if len(dates) < 2 else "holdout 'fraction'"
    return Split(
        frame[~held],
        frame[held],
        dates,
        dates,
        f"{why}: {settings.calibration_fraction:.0%} of its rows, drawn by event_id",
    )


def downsample_negatives(
    frame: pd.DataFrame, rate: float, seed: int, label: str = "label"
) -> pd.DataFrame:
    """Keep every click and a seeded share ``rate`` of the non-clicks."""
    if rate >= 1.0:
        return frame
    return frame[negatives_kept(frame, rate, seed, label)]


def negatives_kept(frame: pd.DataFrame, rate: float, seed: int, label: str = "label") -> np.ndarray:
    """The row mask of :func:`downsample_negatives`, for rows already turned into inputs."""
    if rate >= 1.0:
        return np.ones(len(frame), dtype=bool)
    return (frame[label].to_numpy() == 1) | (_stable_fraction(frame["event_id"], seed + 1) < rate)


MIN_NEGATIVE_RATE = 0.01
"""The lowest negative sampling rate the memory bound chooses: below it the fit would see too
few non-clicks per click to learn where clicks are rare."""


def memory_bounded_rate(rows: int, clicks: int, configured: float, max_rows: int) -> float:
    """The negative sampling rate that keeps at most ``max_rows`` of ``rows`` fit rows in
    memory, every click kept: ``configured`` when that already fits, else the share of the
    negatives that fills what the clicks leave (never below :data:`MIN_NEGATIVE_RATE`). The
    logit correction (``log(rate)``) and the calibration head undo it like a configured rate."""
    negatives = rows - clicks
    if negatives <= 0 or clicks + configured * negatives <= max_rows:
        return configured
    return min(configured, max(MIN_NEGATIVE_RATE, max(max_rows - clicks, 0) / negatives))


def fit_row_counts(
    spec: FeatureSpec, settings: RankerSettings, dates: Sequence[str] | None = None
) -> tuple[int, int]:
    """Rows and clicks the fit would read from ``training/ranking`` on ``dates`` (default all)
    before any sampling, the held-out rows left out as :func:`split_for_calibration` leaves
    them (the ``fraction`` hold-out by its expected share). Reads ``date`` and the label only."""
    path = spec.table_path(RANKING_TABLE)
    table = ds.dataset(path, format="parquet").to_table(
        columns=["date", spec.label], filter=_date_filter(dates)
    )
    if table.num_rows == 0:
        return 0, 0
    days = pc.unique(table["date"])
    rows, clicks = table.num_rows, int(pc.sum(table[spec.label]).as_py() or 0)
    if len(days) >= 2 and settings.holdout == "last_day":
        last = pc.equal(table["date"], pc.max(table["date"]))
        held = table.filter(last)
        return rows - held.num_rows, clicks - int(pc.sum(held[spec.label]).as_py() or 0)
    keep = 1.0 - settings.calibration_fraction
    return round(rows * keep), round(clicks * keep)


def _wide_reads_every_day(settings: RankerSettings, dates: Sequence[str] | None) -> bool:
    """The wide part is fitted first on every training day's fit rows (``wide_days: all``),
    not only on the network's ``dates``."""
    return (
        settings.architecture == "dcn_v2"
        and settings.wide
        and settings.wide_fit == "logistic"
        and settings.wide_days == "all"
        and dates is not None
    )


def _window_reads_every_day(settings: RankerSettings, dates: Sequence[str] | None) -> bool:
    """Some part is fitted on every training day's fit rows: the wide part
    (:func:`_wide_reads_every_day`) or the window FM (``fm_blend``), neither of which reads a
    two-tower score."""
    return _wide_reads_every_day(settings, dates) or (uses_fm(settings) and dates is not None)


def load_split(
    spec: FeatureSpec, settings: RankerSettings, dates: Sequence[str] | None = None
) -> Split:
    """Read ``training/ranking`` (the rows of ``dates``, default all) batch by batch into the
    calibration split, down-sampling the training rows' negatives as they are read: memory holds
    the sampled rows plus the held-out day, never the whole window.

    Raises:
        RankerTrainingError: the table is missing or has no rows on those days.
    """
    wanted = dates
    dates = ranking_dates(spec, wanted)
    if not dates:
        on = "" if wanted is None else f" on {', '.join(wanted)}"
        raise RankerTrainingError(
            f"{spec.table_path(RANKING_TABLE)} has no rows{on}: the training days had no "
            "impressions"
        )
    fit: list[pd.DataFrame] = []
    held: list[pd.DataFrame] = []
    fit_seen = 0
    part = None
    for batch in iter_ranking_rows(spec, dates):
        part = split_for_calibration(batch, settings, dates)
        fit_seen += len(part.fit)
        fit.append(
            downsample_negatives(
                part.fit, settings.negative_sampling_rate, settings.seed, spec.label
            )
        )
        held.append(part.calibration)
    assert part is not None  # dates were found, so some batch had rows

    def ordered(parts: list[pd.DataFrame]) -> pd.DataFrame:
        return pd.concat(parts, ignore_index=True).sort_values(
            ["date", "event_id"], ignore_index=True
        )

    return Split(
        ordered(fit),
        ordered(held),
        part.fit_dates,
        part.calibration_dates,
        part.how,
        fit_rows_before_sampling=fit_seen,
    )


def training_dataset(
    inputs: dict[str, Any], labels: np.ndarray, batch: int, seed: int | None
) -> tf.data.Dataset:
    """``(inputs, labels)`` in batches of ``batch`` rows: with a ``seed``, a permutation of the
    rows drawn anew each epoch (:func:`models.fitting.shuffled_batches`, which shuffles row
    indices, not rows: a buffer of the rows took the 10M ranker stage to 19.4 GB), else in their
    order (the held-out rows)."""
    labels = labels.astype(np.float32)
    if seed is None:
        return (
            tf.data.Dataset.from_tensor_slices((inputs, labels))
            .batch(batch)
            .prefetch(tf.data.AUTOTUNE)
        )
    return shuffled_batches(inputs, batch, seed, labels=labels)


def early_stopping(settings: RankerSettings) -> list[keras.callbacks.Callback]:
    """Stop when the held-out AUC has not improved for ``early_stopping_patience`` epochs and
    keep the best epoch's weights (``epochs`` is then a ceiling); patience 0 trains every epoch.
    Why: at a fixed 3 epochs the demo's validation AUC peaked at epoch 2 (issue 10)."""
    if settings.early_stopping_patience <= 0:
        return []
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_auc",
            mode="max",
            patience=settings.early_stopping_patience,
            restore_best_weights=True,
        )
    ]


def _check_labels(rows: pd.DataFrame, label: str, what: str) -> None:
    clicks = int(rows[label].sum())
    if len(rows) == 0 or clicks in (0, len(rows)):
        raise RankerTrainingError(
            f"the {what} rows ({len(rows)} impressions, {clicks} clicks) hold one class only: "
            "a click model needs both clicks and non-clicks"
        )


def _wide_rows(
    spec: FeatureSpec, settings: RankerSettings, logit_model: keras.Model
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The fit rows of every training day of the folder (the held-out rows left out, split as
    for the network), for the wide part: it reads no two-tower score, so the days the towers
    learned from cannot leak into it. The scores' inputs are NaN (their default)."""
    rows = load_split(spec, settings).fit
    inputs = frame_to_inputs(spec, rows)
    for name in SIMILARITY_INPUTS:
        if name in logit_model.input:
            inputs[name] = np.full(len(rows), np.nan, dtype=np.float32)
    return inputs, rows[spec.label].to_numpy(), rows["date"].to_numpy()


def _calibration_rows(split: Split, settings: RankerSettings) -> np.ndarray:
    """Which held-out rows fit the calibration head: all, or (``calibrate_on: last_day``) those
    of the last held-out day, the nearest to D — when the wide part learns from earlier days, the
    level it carries to D is best read on the latest one."""
    dates = split.calibration["date"].to_numpy()
    if settings.calibrate_on == "last_day" and len(dates):
        return dates == dates.max()
    return np.ones(len(dates), dtype=bool)


def train_ranker(
    spec: FeatureSpec,
    settings: RankerSettings,
    *,
    similarity: SimilarityProvider | None = None,
    progress: bool = True,
    dates: Sequence[str] | None = None,
) -> TrainedRanker:
    """Train, calibrate and measure the ranker (and the LR baseline) from ``spec``'s folder.

    Args:
        spec: a feature spec loaded from a published features folder.
        settings: architecture, sizes, sampling, calibration and seed.
        similarity: two-tower scores; given → the model takes ``sim_user_ad`` and
            ``sim_context_ad`` as inputs and records the embeddings version.
        progress: show Keras progress bars.
        dates: train and calibrate on these training days only (default: all). With
            ``similarity``, days the towers did not learn from (pipelines/training_days.py).

    Returns:
        The trained ranker; ``metrics`` holds held-out (calibration-day) AUC, logloss and
        calibration ratios of the network before/after correction and calibration, and the
        baseline's.

    Raises:
        RankerTrainingError: no training rows, or the training / held-out rows hold one class.
    """
    started = time.perf_counter()
    keras.utils.set_random_seed(settings.seed)
    label = spec.label
    rows, clicks = fit_row_counts(
        spec, settings, None if _window_reads_every_day(settings, dates) else dates
    )
    rate = memory_bounded_rate(rows, clicks, settings.negative_sampling_rate, settings.max_fit_rows)
    if rate < settings.negative_sampling_rate:
        log.warning(
            "ranker: %d fit rows (%d clicks) exceed max_fit_rows %d: negatives kept at %.3f",
            rows, clicks, settings.max_fit_rows, rate,
        )  # fmt: skip
        settings = settings.model_copy(update={"negative_sampling_rate": rate})
    split = load_split(spec, settings, dates)
    fit_rows = split.fit
    _check_labels(fit_rows, label, "training")
    _check_labels(split.calibration, label, "held-out calibration")
    correction = sampling_correction(settings.negative_sampling_rate)

    fit_inputs = frame_to_inputs(spec, fit_rows, similarity=similarity)
    held_inputs = frame_to_inputs(spec, split.calibration, similarity=similarity)
    sim_stats = (
        {n: NumericStats.fitted(n, fit_inputs[n]) for n in SIMILARITY_INPUTS}
        if similarity is not None
        else None
    )
    fit_labels = fit_rows[label].to_numpy()
    held_labels = split.calibration[label].to_numpy()
    logit_model = build_logit_model(
        spec, settings, similarity_stats=sim_stats, base_rate=float(fit_labels.mean())
    )
    held_tensors = _tensors(logit_model, held_inputs)  # for the wide fit's C and the fit
    wide_metrics: dict[str, float] = {}
    ad_features = own_ad_features(spec)  # their OOV rows are served as the average value
    window_inputs, window_labels = fit_inputs, fit_labels
    window_dates = fit_rows["date"].to_numpy()
    if _window_reads_every_day(settings, dates):
        window_inputs, window_labels, window_dates = _wide_rows(spec, settings, logit_model)
    if settings.architecture == "dcn_v2" and settings.wide and settings.wide_fit == "logistic":
        wide_inputs, wide_labels, wide_dates = fit_inputs, fit_labels, fit_rows["date"].to_numpy()
        if _wide_reads_every_day(settings, dates):
            wide_inputs, wide_labels, wide_dates = window_inputs, window_labels, window_dates
        wide_metrics = fit_wide(
            logit_model,
            _tensors(logit_model, wide_inputs),
            wide_labels,
            c=settings.wide_c,
            seed=settings.seed,
            dates=wide_dates,
            day_feature_min_days=settings.wide_day_feature_min_days,
            c_grid=settings.wide_c_grid,
            held=(held_tensors, held_labels, correction),
            prior_scale=settings.wide_prior_scale,
            refit_variance=settings.wide_refit_variance,
            grid_threads=settings.wide_grid_threads,
            oov_as_mean=ad_features,
            row_weights=log_rows(wide_labels, settings.negative_sampling_rate),
        )
        wide_metrics["wide_rows"] = float(len(wide_labels))
    held_fm: np.ndarray | None = None  # the frozen FM's logit of the held-out rows
    if has_fm(logit_model):  # every training day's fit rows and the held-out ones
        kept = negatives_kept(
            split.calibration, settings.negative_sampling_rate, settings.seed, label
        )
        fm_metrics, held_fm = fit_window_fm(
            logit_model,
            _concat_inputs(
                window_inputs, {n: v[kept] for n, v in held_inputs.items()}, logit_model
            ),
            np.concatenate([window_labels, held_labels[kept]]),
            settings,
            held_inputs,
            held_labels,
            oov_as_mean=ad_features,
        )
        wide_metrics.update(fm_metrics)
    del window_inputs, window_labels, window_dates

    network = network_model(logit_model)
    network.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    fit_tensors = _tensors(network, fit_inputs)
    build_before_fit(network, fit_tensors, fit_labels)
    log.info(
        "training ranker %s on %d rows (%s), calibrating on %d rows",
        settings.architecture, len(fit_rows), ", ".join(split.fit_dates), len(split.calibration),
    )  # fmt: skip
    history = network.fit(
        training_dataset(fit_tensors, fit_labels, settings.batch_size, settings.seed),
        validation_data=training_dataset(held_tensors, held_labels, PREDICT_BATCH, None),
        epochs=settings.epochs,
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=1 if progress else 0,
        callbacks=early_stopping(settings),
    )
    held_logits = predict(network, held_inputs)  # the head calibrates the network's logit
    if network is not logit_model:  # the blend's parts, each alone on the held-out rows
        wide_metrics["network_holdout_auc"] = auc(held_labels, held_logits)
    recent = _calibration_rows(split, settings)
    head = fit_calibration(
        held_logits[recent],
        held_labels[recent],
        settings.calibration,
        correction=correction,
        significance=settings.calibration_significance,
    )
    if held_fm is not None:  # the blend's level: as many held-out clicks as the network
        network_p = np.asarray(head(held_logits[recent]))
        level = blend_level(
            network_p,
            held_fm[recent],
            float(network_p.sum()),
            logit_model.get_layer(BLEND).weight,
            head.correction,
        )
        logit_model.get_layer(BLEND).level.assign(level)
        wide_metrics["fm_blend_level"] = level
    model = with_calibration(logit_model, head)
    calibrated = predict(model, held_inputs)
    if network is not logit_model:
        # the window FM fitted these rows too: the held-out figures are the network's (with its
        # head), the served blend's are in-sample and named so
        wide_metrics["holdout_blend_auc_in_sample"] = auc(held_labels, calibrated)
        wide_metrics["holdout_blend_calibration_ratio"] = calibration_ratio(held_labels, calibrated)
        calibrated = np.asarray(head(held_logits))
    uncorrected = 1.0 / (1.0 + np.exp(-held_logits))
    corrected = 1.0 / (1.0 + np.exp(-(held_logits + correction)))
    metrics: dict[str, float] = {
        "holdout_rows": float(len(held_labels)),
        "holdout_clicks": float(held_labels.sum()),
        "holdout_auc": auc(held_labels, calibrated),
        "holdout_logloss": logloss(held_labels, calibrated),
        "holdout_calibration_ratio": calibration_ratio(held_labels, calibrated),
        "holdout_calibration_ratio_uncorrected": calibration_ratio(held_labels, uncorrected),
        "holdout_calibration_ratio_corrected": calibration_ratio(held_labels, corrected),
        **wide_metrics,
        "fit_rows": float(len(fit_rows)),
        "negative_sampling_rate": settings.negative_sampling_rate,
        "fit_rows_before_sampling": float(split.fit_rows_before_sampling or len(fit_rows)),
    }
    baseline = None
    if settings.baseline:
        baseline = train_baseline(
            spec,
            fit_rows,
            split.calibration,
            correction=correction,
            bits=settings.baseline_hash_bits,
            seed=settings.seed,
        )
        base_p = baseline.predict(split.calibration)
        metrics["baseline_holdout_auc"] = auc(held_labels, base_p)
        metrics["baseline_holdout_logloss"] = logloss(held_labels, base_p)
    metrics["train_seconds"] = time.perf_counter() - started
    return TrainedRanker(
        spec=spec,
        settings=settings,
        model=model,
        logit_model=logit_model,
        head=head,
        split=split,
        similarity=similarity,
        baseline=baseline,
        metrics=metrics,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
    )


def _concat_inputs(
    first: dict[str, np.ndarray], second: dict[str, np.ndarray], model: keras.Model
) -> dict[str, np.ndarray]:
    """``model``'s inputs of two row sets, one after the other (an input ``second`` lacks, the
    two-tower scores the window rows carry as NaN, is NaN there too)."""
    n = len(next(iter(second.values())))
    return {
        name: np.concatenate([first[name], second.get(name, np.full(n, np.nan, dtype=np.float32))])
        for name in model.input
    }


def fit_window_fm(
    logit_model: keras.Model,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    settings: RankerSettings,
    held_inputs: dict[str, np.ndarray],
    held_labels: np.ndarray,
    oov_as_mean: Collection[str] = (),
) -> tuple[dict[str, float], np.ndarray]:
    """Fit the window FM of ``logit_model`` (:mod:`models.ranker.fm`) on ``inputs`` (every
    training day's fit rows and the held-out ones) by Adam on the rows' vocabulary indices (looked
    up once, :func:`models.ranker.fm.fm_trainer`), add each ad's random effect to its weight (the
    FM's logit as offset, prior ``fm_ad_effect_variance``), serve the values its rows lack and the
    OOV rows of ``oov_as_mean`` as the average value (:mod:`models.ranker.unseen`), and freeze it.
    Returns its metrics (rows, the effects' spread, its AUC on the held-out rows: in-sample, it
    fitted them) and the frozen FM's logit of the held-out rows, which the blend's level reads."""
    lookups, trainer = fm_trainer(logit_model)
    codes = _codes(lookups, inputs)
    trainer.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    build_before_fit(trainer, codes, labels)
    trainer.fit(
        training_dataset(codes, labels, settings.batch_size, settings.seed),
        epochs=settings.fm_epochs,
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=0,
    )
    tables = fm_tables(logit_model)
    ad = ROLE_KEY["ad"]
    metrics = {"fm_rows": float(len(labels))}
    if settings.fm_ad_effect_variance > 0 and ad in tables:
        offset = _predict_codes(trainer, codes).astype(np.float64)
        table = tables[ad]
        weights = np.asarray(table.get_weights()[0]).copy()
        grid = settings.fm_ad_vector_grid if len(settings.fm_ad_vector_grid) > 1 else []
        if grid or settings.fm_ad_vector_variance > 0:
            query = _query_vectors(logit_model, tables, codes)
            effects, chosen = _ad_vectors(
                offset, codes[ad], query, labels.astype(np.float64), int(table.input_dim),
                settings.fm_ad_effect_variance, grid or [settings.fm_ad_vector_variance],
            )  # fmt: skip
            metrics.update(chosen)
            weights += effects.astype(weights.dtype)
            effect = effects[:, 0]
            seen = np.unique(codes[ad])
            metrics["fm_ad_vector_sd"] = float(effects[seen, 1:].std())
        else:
            effect = random_effects(
                offset, codes[ad], labels.astype(np.float64), int(table.input_dim),
                settings.fm_ad_effect_variance,
            )  # fmt: skip
            weights[:, 0] += effect.astype(weights.dtype)
        table.set_weights([weights])
        metrics["fm_ad_effect_sd"] = float(effect[np.unique(codes[ad])].std())
    rows = log_rows(labels, settings.negative_sampling_rate)
    counts = {
        name: np.bincount(codes[name], weights=rows, minlength=int(table.input_dim))
        for name, table in tables.items()
    }
    metrics["fm_unseen_rows_as_mean"] = float(
        serve_unseen_as_mean(logit_model, tables, counts, oov_as_mean)
    )
    for layer in [*tables.values(), logit_model.get_layer(FM_LOGIT)]:
        layer.trainable = False
    held = _predict_codes(trainer, _codes(lookups, held_inputs))
    metrics["fm_holdout_auc_in_sample"] = auc(held_labels, held)
    return metrics, held


def log_rows(labels: np.ndarray, rate: float) -> np.ndarray:
    """How many of the log's rows each fit row stands for: 1 per click, ``1 / rate`` per negative
    kept at the sampling ``rate`` (the weights of the averages served for unseen values)."""
    return np.where(labels > 0, 1.0, 1.0 / rate)


def own_ad_features(spec: FeatureSpec) -> set[str]:
    """The ad's categorical features: their OOV rows are served as the average value
    (:mod:`models.ranker.unseen` says why only the ad's)."""
    return {f.name for f in spec.by_role("ad") if f.kind == "categorical"}


def _codes(lookups: keras.Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each FM feature's vocabulary index of every row (one pass of the string lookups)."""
    data = tf.data.Dataset.from_tensor_slices(_tensors(lookups, inputs)).batch(PREDICT_BATCH)
    parts = [lookups(batch, training=False) for batch in data]
    return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}


def _ad_vectors(
    offset: np.ndarray,
    ad: np.ndarray,
    query: np.ndarray,
    labels: np.ndarray,
    size: int,
    effect_variance: float,
    grid: Sequence[float],
) -> tuple[np.ndarray, dict[str, float]]:
    """Each ad's effect and own-vector correction (:func:`random_slopes` on ``[1, query]``) for
    the vector variance of ``grid`` whose fit has the highest log evidence
    (:func:`slopes_log_evidence`), with the evidence of each for the training metrics."""
    features = np.column_stack([np.ones(len(labels)), query])
    metrics: dict[str, float] = {}
    best: tuple[float, np.ndarray] | None = None
    for variance in grid:
        variances = [effect_variance] + [variance] * query.shape[1]
        effects = random_slopes(offset, ad, features, labels, size, variances)
        if len(grid) > 1:
            evidence = slopes_log_evidence(offset, ad, features, labels, effects, variances)
            metrics[f"fm_ad_vector_evidence_v{variance:g}"] = evidence
            if best is not None and evidence <= best[0]:
                continue
            best = (evidence, effects)
        else:
            best = (0.0, effects)
        metrics["fm_ad_vector_variance"] = variance
    assert best is not None
    return best[1], metrics


def _query_vectors(
    logit_model: keras.Model, tables: dict[str, keras.layers.Layer], codes: dict[str, np.ndarray]
) -> np.ndarray:
    """Each row's query vector in the FM (the sum of its user and context features' vectors),
    which an ad's own vector multiplies."""
    fm = logit_model.get_layer(FM_LOGIT)
    query = [name for name, role in zip(fm.features, fm.roles, strict=True) if role == "query"]
    vectors = [np.asarray(tables[name].get_weights()[0])[:, 1:] for name in query]
    return sum(v[codes[name]].astype(np.float64) for v, name in zip(vectors, query, strict=True))


def _predict_codes(model: keras.Model, codes: dict[str, np.ndarray]) -> np.ndarray:
    data = tf.data.Dataset.from_tensor_slices(codes).batch(PREDICT_BATCH)
    return np.concatenate([np.asarray(model(batch, training=False)).reshape(-1) for batch in data])


def on_served_scores(trained: TrainedRanker, served: SimilarityProvider) -> TrainedRanker:
    """``trained`` reading the two-tower scores of ``served`` embeddings, standardised by their
    own statistics on its fit rows, so the network sees them on the scale it was trained on.

    Why: the served towers may be another fit than those whose scores the ranker learned from
    (``lifecycle.refit_towers``: refitted on the whole window). Their ordering is the same kind,
    their scale is not — on TalkingData the one-day towers spread the ranker's rows 0.03, the
    three-day towers D's 0.12-0.18 — and read through the training statistics, most of D's
    scores land at the standardisation's clip and the ranker over-predicts. The weights (wide
    part and calibration head included) are the trained ones; only the constants that
    standardise the scores change. Without scores, or for the very provider it trained on, the
    ranker is returned as it is.
    """
    if trained.similarity is None or served is trained.similarity:
        return trained

    inputs = frame_to_inputs(trained.spec, trained.split.fit, similarity=served)
    stats = {n: NumericStats.fitted(n, inputs[n]) for n in SIMILARITY_INPUTS}
    trained_scale = {  # what the network was trained on, as its standardisation holds it
        s["name"]: s["std"] for s in trained.logit_model.get_layer("standardize").stats
    }
    logit_model = build_logit_model(trained.spec, trained.settings, similarity_stats=stats)
    logit_model.set_weights(trained.logit_model.get_weights())
    metrics = dict(trained.metrics)
    for name in SIMILARITY_INPUTS:  # how far apart the two scales were (1: the same)
        metrics[f"served_{name}_std_ratio"] = stats[name].std / max(trained_scale[name], 1e-12)
    return replace(
        trained,
        model=with_calibration(logit_model, trained.head),
        logit_model=logit_model,
        similarity=served,
        metrics=metrics,
    )
