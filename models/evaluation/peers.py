"""The ranker's peers on day D: the simple models an ads engineer would try first.

A ranker is only worth serving when it beats what is cheap (issue 10): a one-hot logistic
regression, gradient-boosted trees with native categoricals, and the ad's smoothed training CTR.
Each peer here is fitted on the features folder's training rows (the days before D, a seeded
sample of at most ``max_rows``) from the feature spec alone, and scores any frame of the spec's
columns — the evaluation rows of D, or the candidate rows of a replayed request (a peer also
answers the ranker backend's ``predict(common, candidates)``, so the replay ranks with it through
the serving path). Nothing here reads the ranker: the peers are the yardstick, not its helpers.

Measured on the demo (4 days x 20k, day 4): see docs/history/model-quality.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from deepclick.errors import DeepclickError
from models.feature_spec import ROLE_KEY, FeatureSpec, standard_scale

LOGISTIC = "logistic_regression"
GBDT = "gbdt"
AD_PRIOR = "ad_ctr_prior"
PEERS: tuple[str, ...] = (LOGISTIC, GBDT, AD_PRIOR)
GBDT_MAX_CATEGORIES = 250
"""Native categoricals of HistGradientBoosting must be < 255 codes: rarer values are pooled."""
AD_KEY = ROLE_KEY["ad"]


class PeerError(DeepclickError, ValueError):
    """Peers cannot be fitted (no training rows, one class only); the message says which."""


class Peer(Protocol):
    """A fitted peer: click probabilities for rows of the spec's feature columns."""

    name: str

    def predict(self, frame: pd.DataFrame) -> np.ndarray: ...


@dataclass(frozen=True)
class PeerColumns:
    """Which spec columns a peer reads, and how a missing value is filled."""

    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    log1p: frozenset[str]
    numeric_default: Mapping[str, float]
    missing_value: str

    @classmethod
    def of(cls, spec: FeatureSpec) -> PeerColumns:
        numeric = [f for f in spec.numeric]
        defaults: dict[str, float] = {}
        for f in numeric:
            value = f.default
            if not isinstance(value, int | float) or math.isnan(value):
                value = math.expm1(f.mean or 0.0) if f.log1p else (f.mean or 0.0)
            defaults[f.name] = float(value)
        return cls(
            tuple(f.name for f in spec.categorical),
            tuple(f.name for f in numeric),
            frozenset(f.name for f in numeric if f.log1p),
            defaults,
            spec.missing_value,
        )

    def categories(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Categorical columns as strings (absent or null → the missing marker); numpy, not
        pandas, per column: the replay calls this once per request."""
        out = {}
        for name in self.categorical:
            if name in frame.columns:
                values = frame[name].to_numpy(dtype=object)
                text = values.astype(str).astype(object)
                text[pd.isna(values) | (text == "")] = self.missing_value
                out[name] = text
            else:
                out[name] = np.full(len(frame), self.missing_value, dtype=object)
        return pd.DataFrame(out, index=frame.index)

    def numbers(self, frame: pd.DataFrame) -> np.ndarray:
        """Numeric columns as float64 (absent or null → default; log1p where the spec says)."""
        columns = []
        for name in self.numeric:
            default = self.numeric_default[name]
            if name in frame.columns:
                x = pd.to_numeric(frame[name], errors="coerce").fillna(default).to_numpy(float)
            else:
                x = np.full(len(frame), default)
            columns.append(np.log1p(np.maximum(x, 0.0)) if name in self.log1p else x)
        return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0))


def _standardise(fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = fit.mean(axis=0) if fit.size else np.zeros(fit.shape[1])
    scale = np.array(
        [standard_scale(float(s), float(m)) for s, m in zip(fit.std(axis=0), mean, strict=True)]
    )
    return mean, scale


@dataclass
class OneHotLogistic:
    """Logistic regression on one indicator per ``feature=value`` (every value seen in training,
    unseen ones all-zero) plus the standardised numeric features; L2 with ``C`` = 0.1."""

    columns: PeerColumns
    encoder: OneHotEncoder
    mean: np.ndarray
    scale: np.ndarray
    model: LogisticRegression
    name: str = LOGISTIC
    _linear: _LinearWeights | None = field(default=None, repr=False)

    def design(self, frame: pd.DataFrame) -> sp.csr_matrix:
        numbers = (self.columns.numbers(frame) - self.mean) * self.scale
        parts = [self.encoder.transform(self.columns.categories(frame)), sp.csr_matrix(numbers)]
        return sp.hstack(parts, format="csr")

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """``predict_proba`` of the fitted model, computed as a sum of looked-up weights.

        The model is linear in one indicator per ``feature=value``, so its logit is the
        intercept, one weight per categorical feature (0 for a value unseen in training) and the
        numeric part. Building the sparse one-hot design through the encoder cost ~0.1 s per
        call, which the replay pays once per request (1,000-2,000 requests in the demo)."""
        weights = self._weights()
        logit = np.full(len(frame), weights.intercept)
        categories = self.columns.categories(frame)
        for name, values, value_weights in weights.categorical:
            rows = values.get_indexer(categories[name].to_numpy())
            logit += np.where(rows >= 0, value_weights[rows], 0.0)
        numbers = (self.columns.numbers(frame) - self.mean) * self.scale
        logit += numbers @ weights.numeric
        return 1.0 / (1.0 + np.exp(-logit))

    def _weights(self) -> _LinearWeights:
        if self._linear is None:
            self._linear = _LinearWeights.of(self.encoder, self.columns, self.model)
        return self._linear


@dataclass(frozen=True)
class _LinearWeights:
    """A fitted one-hot logistic regression's coefficients, per feature and value."""

    intercept: float
    categorical: tuple[tuple[str, pd.Index, np.ndarray], ...]
    numeric: np.ndarray

    @classmethod
    def of(
        cls, encoder: OneHotEncoder, columns: PeerColumns, model: LogisticRegression
    ) -> _LinearWeights:
        coef = model.coef_[0].astype(np.float64)
        tables, start = [], 0
        for name, values in zip(columns.categorical, encoder.categories_, strict=True):
            tables.append((name, pd.Index(values), coef[start : start + len(values)]))
            start += len(values)
        return cls(float(model.intercept_[0]), tuple(tables), coef[start:])


def fit_logistic(
    columns: PeerColumns, frame: pd.DataFrame, labels: np.ndarray, *, c: float = 0.1, seed: int = 7
) -> OneHotLogistic:
    encoder = OneHotEncoder(handle_unknown="ignore", dtype=np.float32)
    encoder.fit(columns.categories(frame))
    mean, scale = _standardise(columns.numbers(frame))
    peer = OneHotLogistic(columns, encoder, mean, scale, LogisticRegression())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        peer.model = LogisticRegression(C=c, max_iter=200, random_state=seed).fit(
            peer.design(frame), labels
        )
    return peer


@dataclass
class BoostedTrees:
    """scikit-learn's HistGradientBoosting with native categoricals (the ``GBDT_MAX_CATEGORIES``
    most frequent values of each feature, the rest pooled; unseen values are missing)."""

    columns: PeerColumns
    encoder: OrdinalEncoder | None
    model: HistGradientBoostingClassifier
    name: str = GBDT

    def design(self, frame: pd.DataFrame) -> np.ndarray:
        parts = [self.columns.numbers(frame)]
        if self.encoder is not None:
            parts.insert(0, self.encoder.transform(self.columns.categories(frame)))
        return np.hstack(parts).astype(np.float64)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(self.design(frame))[:, 1]


def fit_gbdt(
    columns: PeerColumns,
    frame: pd.DataFrame,
    labels: np.ndarray,
    *,
    max_iter: int = 200,
    seed: int = 7,
) -> BoostedTrees:
    encoder = None
    if columns.categorical:
        encoder = OrdinalEncoder(
            handle_unknown="use_encoded_value",
            unknown_value=np.nan,
            max_categories=GBDT_MAX_CATEGORIES,
            dtype=np.float64,
        ).fit(columns.categories(frame))
    mask = [True] * len(columns.categorical) + [False] * len(columns.numeric)
    peer = BoostedTrees(columns, encoder, HistGradientBoostingClassifier())
    peer.model = HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=0.1,
        categorical_features=mask if any(mask) else None,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        l2_regularization=1.0,
        random_state=seed,
    ).fit(peer.design(frame), labels)
    return peer


@dataclass
class AdPrior:
    """The ad's smoothed training CTR, ``(clicks + m·ctr) / (impressions + m)`` with the spec's
    prior strength ``m``; an ad never seen in training gets the global CTR."""

    rates: pd.Series
    global_ctr: float
    name: str = AD_PRIOR

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        ads = frame[AD_KEY].astype(str)
        return ads.map(self.rates).fillna(self.global_ctr).to_numpy(dtype=np.float64)


def fit_prior(frame: pd.DataFrame, labels: np.ndarray, strength: float) -> AdPrior:
    ctr = float(labels.mean())
    grouped = pd.DataFrame({"ad": frame[AD_KEY].astype(str).to_numpy(), "y": labels}).groupby("ad")[
        "y"
    ]
    rates = (grouped.sum() + strength * ctr) / (grouped.count() + strength)
    return AdPrior(rates, ctr)


@dataclass
class Peers:
    """Every fitted peer, with what they were fitted on."""

    models: dict[str, Peer]
    rows: int
    clicks: int
    dates: list[str] = field(default_factory=list)

    def scores(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            name: np.asarray(p.predict(frame), dtype=np.float64) for name, p in self.models.items()
        }

    def describe(self) -> dict[str, Any]:
        return {
            "peers": list(self.models),
            "rows": self.rows,
            "clicks": self.clicks,
            "dates": self.dates,
        }


def read_training_rows(spec: FeatureSpec, max_rows: int, seed: int = 7) -> pd.DataFrame:
    """A seeded uniform sample of at most ``max_rows`` rows of ``training/ranking`` (every
    training day, all the columns a peer reads)."""
    path = spec.table_path("training/ranking")
    wanted = {spec.label, AD_KEY, *spec.names}
    dataset = pq.ParquetDataset(path)
    names = [n for n in dataset.schema.names if n in wanted]
    table = dataset.read(columns=names)
    if table.num_rows > max_rows:
        rng = np.random.default_rng(seed)
        table = table.take(np.sort(rng.choice(table.num_rows, max_rows, replace=False)))
    return table.to_pandas()


def fit_peers(
    spec: FeatureSpec,
    rows: pd.DataFrame,
    *,
    names: Sequence[str] = PEERS,
    gbdt_iterations: int = 200,
    seed: int = 7,
) -> Peers:
    """Fit the named peers on ``rows`` (training rows of ``spec``'s columns and label).

    Raises:
        PeerError: no rows, or only one class (nothing to learn from).
    """
    if rows.empty:
        raise PeerError(f"features {spec.version}: no training rows to fit the peers on")
    labels = rows[spec.label].to_numpy().astype(int)
    if labels.min() == labels.max():
        raise PeerError(
            f"features {spec.version}: the {len(labels)} training rows are all "
            f"{'clicks' if labels[0] else 'non-clicks'}; the peers need both"
        )
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise PeerError(f"unknown peer(s) {unknown}; peers are {', '.join(PEERS)}")
    columns = PeerColumns.of(spec)
    models: dict[str, Peer] = {}
    for name in names:
        if name == LOGISTIC:
            models[name] = fit_logistic(columns, rows, labels, seed=seed)
        elif name == GBDT:
            models[name] = fit_gbdt(columns, rows, labels, max_iter=gbdt_iterations, seed=seed)
        else:
            models[name] = fit_prior(rows, labels, spec.ctr_prior_strength)
    return Peers(models, len(rows), int(labels.sum()), list(spec.train_dates))


def inputs_frame(
    common: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray]
) -> pd.DataFrame:
    """A ranker request (``serving.features.Gathered``: shared ``[1]`` inputs, per-candidate
    ``[N]`` inputs, strings as bytes) as one row per candidate, the form a peer scores."""
    n = len(next(iter(candidates.values()))) if candidates else 0
    out: dict[str, Any] = {}
    for name, values in {**common, **candidates}.items():
        values = np.asarray(values)
        if values.dtype.kind == "S":
            values = np.char.decode(values, "utf-8").astype(object)
        out[name] = np.repeat(values, n) if name in common and values.shape[0] == 1 else values
    return pd.DataFrame(out)
