"""Fitting the ranker's first-order (wide) part as what it is: an L2 logistic regression.

The wide part (:func:`models.ranker.model._wide`) holds one scalar per categorical value and one
per standardised number. Trained by a few epochs of Adam together with the network, the weights of
ids seen a handful of times barely move (a rare user gets ~3 updates), while a one-hot logistic
regression solved to convergence learns exactly those per-id biases — and beat the ranker on the
demo (issue 10). So with ``wide_fit: logistic`` the wide weights are first solved as a regularised
logistic regression over the model's own vocabulary indices and standardised numbers
(scikit-learn, L-BFGS, the peer's ``C``), written into the layers and frozen; the cross and deep
parts, whose output weight starts at zero, then learn only what the linear model leaves over
(the residual), and held-out early stopping keeps them from undoing it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from models.evaluation.ranking import logloss
from models.ranker.crosses import CROSS_INDEX_PREFIX, WIDE_CROSS_PREFIX
from models.ranker.model import WIDE_NUMERIC, WIDE_PREFIX
from models.ranker.unseen import ServedMean, oov_indices, unseen_mean

WIDE_MAX_ITER = 500
"""L-BFGS iterations; the demo's 18k-60k rows converge in well under 200."""


def wide_layers(logit_model: keras.Model) -> tuple[list[keras.layers.Layer], Any | None]:
    """The wide weight tables — per feature (in input order), then per cross
    (:mod:`models.ranker.crosses`) — and the numeric wide layer (or None)."""
    tables = [layer for layer in logit_model.layers if layer.name.startswith(WIDE_PREFIX)]
    if not tables:
        raise ValueError(
            f"model {logit_model.name!r} has no wide part: build it with ranker.wide true"
        )
    tables += [layer for layer in logit_model.layers if layer.name.startswith(WIDE_CROSS_PREFIX)]
    names = {layer.name for layer in logit_model.layers}
    numeric = logit_model.get_layer(WIDE_NUMERIC) if WIDE_NUMERIC in names else None
    return tables, numeric


def wide_design(
    logit_model: keras.Model, inputs: Mapping[str, Any], batch: int = 8192
) -> sp.csr_matrix:
    """The rows of ``inputs`` as the wide part sees them: one indicator column per vocabulary
    index of each categorical feature (OOV buckets included, features side by side), one per
    cell of each cross, then the standardised numbers — so a coefficient vector maps one-to-one
    onto the wide weights."""
    tables, numeric = wide_layers(logit_model)
    outputs = [logit_model.get_layer(_index_layer(t.name)).output for t in tables]
    if numeric is not None:
        outputs.append(logit_model.get_layer("standardize").output)
    probe = keras.Model(logit_model.input, outputs)
    values = probe.predict(dict(inputs), batch_size=batch, verbose=0)
    values = values if isinstance(values, list) else [values]
    n = len(values[0])
    blocks = []
    for table, index in zip(tables, values[: len(tables)], strict=True):
        size = int(table.input_dim)
        cols = np.asarray(index, dtype=np.int64).reshape(-1)
        blocks.append(
            sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), cols)), shape=(n, size))
        )
    if numeric is not None:
        width = int(numeric.get_weights()[0].shape[0])  # spec numbers, not the two-tower scores
        blocks.append(sp.csr_matrix(np.asarray(values[-1], dtype=np.float32)[:, :width]))
    return sp.hstack(blocks, format="csr")


def _index_layer(table: str) -> str:
    """The layer whose output indexes wide table ``table``: a feature's vocabulary lookup, or a
    cross's cell (:class:`models.ranker.crosses.CrossIndex`)."""
    if table.startswith(WIDE_CROSS_PREFIX):
        return CROSS_INDEX_PREFIX + table.removeprefix(WIDE_CROSS_PREFIX)
    return "lookup__" + table.removeprefix(WIDE_PREFIX)


def day_constant_mean(
    size: int, index: np.ndarray, day: np.ndarray, min_days: int
) -> ServedMean | None:
    """When a categorical feature is constant within each training day (the day of the week),
    its values seen on fewer than ``min_days`` days are served as the mean of the others; None
    when the feature varies within a day (or ``min_days`` is 0).

    Why: a value that marks a single day is that day's intercept, not the value's effect. Medium
    world, D = 2024-01-08 (a Monday), wide part on days 1-6: the only Monday was the log's first
    day (no history at all), and D's rows scored with that day's weight predicted 1.418x D's
    clicks; rescored as the head's Sunday, 0.998x (docs/history/model-quality.md).

    Args:
        size: the feature's vocabulary size (OOV buckets included).
        index: the vocabulary index of each fit row.
        day: the training day of each fit row as an integer code (:func:`day_codes`).
        min_days: days a value must be seen on for its own weight to be kept (0: off).
    """
    if min_days <= 0 or len(index) == 0:
        return None
    days = int(day.max()) + 1
    pairs = np.unique(np.asarray(index, dtype=np.int64) * days + day)  # each (value, day) seen
    values, days_per_value = np.unique(pairs // days, return_counts=True)
    if len(np.unique(pairs % days)) != len(pairs):  # some day holds two values: not day-level
        return None
    trusted = np.zeros(size, dtype=bool)
    trusted[values[days_per_value >= min_days]] = True
    rows = np.bincount(index, minlength=size)
    seen = rows > 0
    return ServedMean(~trusted, trusted if trusted.any() else seen, rows)


def day_codes(dates: np.ndarray) -> np.ndarray:
    """Each row's day as a small integer (the order of the sorted dates)."""
    return np.unique(np.asarray(dates), return_inverse=True)[1].reshape(-1)


def average_unseen(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One table's ``weights`` with the values absent from the fit rows set to the mean weight
    (:func:`unseen_mean`)."""
    return unseen_mean(rows).apply(weights)


def average_day_constant(
    weights: np.ndarray, index: np.ndarray, dates: np.ndarray, min_days: int
) -> np.ndarray:
    """One table's ``weights`` with the values of a day-constant feature seen on fewer than
    ``min_days`` of the ``dates`` set to the mean weight (:func:`day_constant_mean`); other
    features come back unchanged."""
    served = day_constant_mean(len(weights), index, day_codes(dates), min_days)
    return weights if served is None else served.apply(weights)


def served_means(
    design: sp.csr_matrix,
    sizes: Sequence[int],
    dates: np.ndarray | None = None,
    day_feature_min_days: int = 0,
    oov: Sequence[int] | None = None,
    row_weights: np.ndarray | None = None,
) -> list[ServedMean]:
    """One :class:`ServedMean` per wide table (``sizes``, in :func:`wide_layers` order): values
    absent from ``design``'s rows and each table's ``oov`` leading OOV indices are served as the
    mean (:func:`models.ranker.unseen.unseen_mean`), and with ``dates``, so are the rare values
    of a day-constant feature (their basis being the trusted values, all of them seen).

    The mean weighs each value by its fit rows, each row counted by ``row_weights`` (with sampled
    negatives: 1 per click, 1 / rate per kept negative, the rows as the log has them, as the
    window FM counts them); without ``row_weights`` every row counts 1."""
    support = np.asarray(
        design.sum(axis=0) if row_weights is None else design.T @ row_weights
    ).reshape(-1)
    day = day_codes(dates) if dates is not None and day_feature_min_days > 0 else None
    means, start = [], 0
    for position, size in enumerate(sizes):
        rows = support[start : start + size]
        served = unseen_mean(rows, 0 if oov is None else oov[position])
        if day is not None:
            index = design[:, start : start + size].tocsr()
            if index.nnz == design.shape[0]:  # one value per row: a categorical feature
                served = day_constant_mean(size, index.indices, day, day_feature_min_days) or served
        means.append(served)
        start += size
    return means


@dataclass(frozen=True)
class WideSolution:
    """One solved wide part: the weights of each table (unseen and day-constant values already
    set as :func:`fit_wide` writes them), the numeric weights and the intercept."""

    c: float
    blocks: list[np.ndarray]
    numeric: np.ndarray | None
    intercept: float

    def logits(self, design: sp.csr_matrix) -> np.ndarray:
        """The wide part's logit of each row of ``design`` (:func:`wide_design`), as the model
        computes it once these weights are written."""
        parts = [*self.blocks, *([self.numeric] if self.numeric is not None else [])]
        return np.asarray(design @ np.concatenate(parts)).reshape(-1) + self.intercept


def solve_wide(
    design: sp.csr_matrix,
    sizes: Sequence[int],
    labels: np.ndarray,
    *,
    c: float,
    seed: int,
    served: Sequence[ServedMean] | None = None,
    column_scale: np.ndarray | None = None,
) -> WideSolution:
    """The L2 logistic regression (inverse strength ``c``) of ``labels`` on ``design``, split
    into the weight tables of ``sizes`` (in :func:`wide_layers` order) and post-processed as
    served: each table's ``served`` values get its mean weight (:func:`served_means`; by
    default those absent from the rows).

    ``column_scale`` (one factor per column of ``design``) gives each column its own prior: the
    fit sees the column multiplied by ``s``, so the weight it returns (``s`` times the fitted
    one) has prior variance ``c·s²`` under the same L2 penalty.
    """
    fitted = design if column_scale is None else design @ sp.diags(column_scale).tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=c, max_iter=WIDE_MAX_ITER, random_state=seed).fit(
            fitted, np.asarray(labels).astype(int)
        )
    coef = lr.coef_.reshape(-1)
    if column_scale is not None:
        coef = coef * column_scale
    coef = coef.astype(np.float32)
    served = served_means(design, sizes) if served is None else served
    blocks, start = [], 0
    for size, mean in zip(sizes, served, strict=True):
        blocks.append(mean.apply(coef[start : start + size]))
        start += size
    numeric = coef[start:] if start < len(coef) else None
    return WideSolution(c, blocks, numeric, float(lr.intercept_[0]))


def feature_column_scale(
    tables: Sequence[keras.layers.Layer], columns: int, prior_scale: Mapping[str, float]
) -> np.ndarray | None:
    """One factor per column of :func:`wide_design`: ``prior_scale[feature]`` on the columns of
    that feature's table, 1 elsewhere (crosses and numbers included); None when no table is
    named (a spec without the feature keeps the plain fit)."""
    named = named_tables(tables, prior_scale)
    if not named:
        return None
    starts = np.concatenate([[0], np.cumsum([int(t.input_dim) for t in tables])])
    scale = np.ones(columns)
    for position, factor in named.items():
        scale[starts[position] : starts[position + 1]] = factor
    return scale


def named_tables(
    tables: Sequence[keras.layers.Layer], values: Mapping[str, float]
) -> dict[int, float]:
    """Position (in :func:`wide_layers` order) → value, for each feature table whose feature
    ``values`` names; crosses and names the model lacks are left out."""
    return {
        position: float(values[table.name.removeprefix(WIDE_PREFIX)])
        for position, table in enumerate(tables)
        if table.name.startswith(WIDE_PREFIX) and table.name.removeprefix(WIDE_PREFIX) in values
    }


REFIT_STEPS = 6
"""Newton steps of :func:`random_slopes`: a small system per value, so each step is exact up to
the curvature's change, and six leave the weights still to well under 1e-3."""
MAX_EFFECT_STEP = 1.0
"""Largest change of one effect in one step: a value whose few rows all click must not jump
from 0 far past its mode on the first step."""


def random_effects(
    offset: np.ndarray, value: np.ndarray, labels: np.ndarray, size: int, variance: float
) -> np.ndarray:
    """One logit effect per value (``size`` of them) at its posterior mode under a Gaussian
    prior of ``variance``, given each row's ``offset`` logit, its ``value`` and its click: the
    random effect of a GLMix-style model (:func:`random_slopes` on a column of ones; values
    without rows stay 0)."""
    ones = np.ones((len(value), 1))
    return random_slopes(offset, value, ones, labels, size, [variance])[:, 0]


def per_value_gram(value: np.ndarray, weight: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """``Σ weight · x xᵀ`` over each value's rows (``size`` × width × width): the likelihood's
    curvature of :func:`random_slopes`' per-value systems, one bincount per cell."""
    width = x.shape[1]
    gram = np.zeros((size, width, width))
    for i in range(width):
        for j in range(i, width):
            cell = np.bincount(value, weight * x[:, i] * x[:, j], minlength=size)
            gram[:, i, j] = gram[:, j, i] = cell
    return gram


def random_slopes(
    offset: np.ndarray,
    value: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    size: int,
    variances: Sequence[float],
    start: np.ndarray | None = None,
    steps: int = REFIT_STEPS,
) -> np.ndarray:
    """One effect vector per value (``size`` × ``features.shape[1]``) at its posterior mode
    under independent Gaussian priors of ``variances`` (one per column of ``features``), given
    each row's ``offset`` logit, its ``value``, its ``features`` and its click: row ``r`` of
    value ``v`` has logit ``offset[r] + effect[v] · features[r]``. With a single column of ones
    this is :func:`random_effects`; with the FM's query vector beside the ones it is each ad's
    own taste vector (a GLMix per-item model) at its exact mode given the rest, where Adam gives
    an ad seen a few dozen times a few dozen updates. ``steps`` Newton steps from ``start``
    (default zeros), every value's small system solved at once and each change clipped to
    ``MAX_EFFECT_STEP``; values without rows go to (or stay at) 0, their prior's mode."""
    x = np.asarray(features, dtype=np.float64)
    width = x.shape[1]
    precision = 1.0 / np.asarray(variances, dtype=np.float64)
    if precision.shape != (width,):
        raise ValueError(f"{width} feature columns need {width} variances, got {len(variances)}")
    effect = np.zeros((size, width)) if start is None else np.array(start, dtype=np.float64)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(offset + np.einsum("rk,rk->r", effect[value], x))))
        residual, weight = labels - p, p * (1.0 - p)
        gradient = (
            np.stack(
                [np.bincount(value, residual * x[:, i], minlength=size) for i in range(width)], 1
            )
            - effect * precision
        )
        curvature = per_value_gram(value, weight, x, size) + np.diag(precision)
        step = np.linalg.solve(curvature, gradient[..., None])[..., 0]
        effect += np.clip(step, -MAX_EFFECT_STEP, MAX_EFFECT_STEP)
    return effect


def slopes_log_evidence(
    offset: np.ndarray,
    value: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    effect: np.ndarray,
    variances: Sequence[float],
) -> float:
    """The Laplace approximation of the log marginal likelihood of ``labels`` under
    :func:`random_slopes`' model, at its mode ``effect``, summed over the values with rows:
    how well the prior ``variances`` explain the rows once each value's effect is integrated
    out (type-II maximum likelihood). Comparing it across variances chooses the prior's width
    from the fit rows themselves: wide where each value has many rows that agree, narrow where a
    few rows would only be fitted as noise."""
    x = np.asarray(features, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    seen = np.unique(value)
    eta = offset + np.einsum("rk,rk->r", effect[value], x)
    log_likelihood = float(np.sum(labels * eta - np.logaddexp(0.0, eta)))
    p = 1.0 / (1.0 + np.exp(-eta))
    weight = p * (1.0 - p)
    position = np.searchsorted(seen, value)
    curvature = per_value_gram(position, weight, x, len(seen)) + np.diag(1.0 / var)
    _, log_det = np.linalg.slogdet(curvature)
    prior = -0.5 * np.sum(effect[seen] ** 2 / var) - 0.5 * len(seen) * np.sum(np.log(var))
    return log_likelihood + float(prior) - 0.5 * float(np.sum(log_det))


def refit_feature_weights(
    solution: WideSolution,
    design: sp.csr_matrix,
    sizes: Sequence[int],
    labels: np.ndarray,
    variances: Mapping[int, float],
) -> WideSolution:
    """``solution`` with the weights of the tables ``variances`` names (table position → prior
    variance) moved to their posterior mode given every other weight: one Gaussian random
    effect per value, fitted by Newton steps on the fit rows with the solved logit as offset.

    The alternative to a wider prior in the joint fit (``prior_scale``), where the ids also take
    over what their campaign, brand and category weights carried, which D's new ads need: here
    every other weight stays as solved, and a value the rows never showed keeps its weight.
    Neither won everywhere (docs/history/model-quality.md, session 15), so both are off by default.
    """
    blocks = [block.astype(np.float64) for block in solution.blocks]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    eta = solution.logits(design).astype(np.float64)
    y = np.asarray(labels, dtype=np.float64)
    for position, variance in variances.items():
        index = design[:, starts[position] : starts[position + 1]].tocsr()
        if index.nnz != design.shape[0]:
            raise ValueError(f"wide table {position} is not one categorical value per row")
        value = index.indices
        effect = random_effects(eta, value, y, int(sizes[position]), variance)
        blocks[position] = blocks[position] + effect
        eta = eta + effect[value]
    return WideSolution(
        solution.c,
        [block.astype(np.float32) for block in blocks],
        solution.numeric,
        solution.intercept,
    )


def held_out_logloss(solution: WideSolution, design: sp.csr_matrix, labels: np.ndarray,
                     correction: float) -> float:  # fmt: skip
    """Log loss of the wide part alone on held-out rows, its logits shifted by ``correction``
    (the fit rows' negative down-sampling, :func:`models.ranker.calibration.sampling_correction`)
    so that every ``C`` is judged on the held-out rows' own click rate."""
    return logloss(labels, 1.0 / (1.0 + np.exp(-(solution.logits(design) + correction))))


GridSolve = Callable[[float], WideSolution]


def walk_c_grid(
    solve: GridSolve,
    held_loss: Callable[[WideSolution], float],
    c_grid: Sequence[float],
    *,
    threads: int = 1,
) -> tuple[dict[float, float], WideSolution]:
    """The held-out loss of each ``C`` solved and the solution with the lowest one, walking the
    grid from the strongest L2 (smallest ``C``) in waves of ``threads`` solves run side by side
    (the sparse products release the GIL), and stopping after the first wave whose last value
    is not the best so far: along an L2 path the held-out loss falls to one minimum and rises
    after it, so the weaker strengths beyond a rise cannot win, and they are the slowest solves
    (10M rows of D 2024-01-08: 86 s at ``C`` 0.03, 139 s at 0.1, 212 s at 0.3, which lost).
    """
    values = sorted(set(c_grid))
    losses: dict[float, float] = {}
    best: tuple[float, WideSolution] | None = None
    width = max(1, threads)
    with ThreadPoolExecutor(max_workers=width) as pool:
        for first in range(0, len(values), width):
            wave = values[first : first + width]
            for strength, candidate in zip(wave, pool.map(solve, wave), strict=True):
                losses[strength] = held_loss(candidate)
                if best is None or losses[strength] < best[0]:
                    best = (losses[strength], candidate)
            assert best is not None
            if best[1].c != wave[-1]:  # the loss rose past its minimum
                break
    assert best is not None
    return losses, best[1]


def fit_wide(
    logit_model: keras.Model,
    inputs: Mapping[str, Any],
    labels: np.ndarray,
    *,
    c: float,
    seed: int,
    dates: np.ndarray | None = None,
    day_feature_min_days: int = 0,
    c_grid: Sequence[float] = (),
    held: tuple[Mapping[str, Any], np.ndarray, float] | None = None,
    prior_scale: Mapping[str, float] | None = None,
    refit_variance: Mapping[str, float] | None = None,
    grid_threads: int = 1,
    oov_as_mean: Collection[str] = (),
    row_weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Solve the wide part as an L2 logistic regression (inverse strength ``c``) on ``inputs``,
    write its weights into the model, set the output bias to its intercept, zero the deep
    output weights (the network starts as exactly this regression) and freeze the wide part.

    With ``dates`` (each fit row's day) and ``day_feature_min_days``, a feature constant within
    each day keeps its own weight only for values seen on that many days
    (:func:`average_day_constant`).

    With ``c_grid`` and ``held`` (held-out inputs, labels and the sampling correction), the
    wide part is solved once per ``C`` of the grid and the one with the lowest held-out log loss
    (:func:`held_out_logloss`) is kept, ``c`` ignored: the best strength moves with the data
    (docs/history/model-quality.md: 0.03 at demo and medium scale, 0.1 on TalkingData, whose
    held-out day, like D, is mostly users the fit never saw). :func:`walk_c_grid` solves
    ``grid_threads`` values side by side and stops once the loss has risen.

    With ``prior_scale`` (feature name → factor), that feature's weights get a prior std the
    factor times the others' (:func:`solve_wide`'s ``column_scale``). With ``refit_variance``
    (feature name → variance), that feature's weights of the kept solution are then refitted as
    random effects around it (:func:`refit_feature_weights`).

    Values absent from the fit rows, and the OOV indices of the features in ``oov_as_mean`` (the
    ad's own), are served as the feature's average weight (:mod:`models.ranker.unseen`), each
    fit row counted by ``row_weights`` (:func:`served_means`).

    Returns the fit's intercept, its ``C``, the number of nonzero weights and, with a grid, each
    ``C``'s held-out log loss, for the training metrics.
    """
    tables, numeric = wide_layers(logit_model)
    sizes = [int(table.input_dim) for table in tables]
    design = wide_design(logit_model, inputs)
    scale = feature_column_scale(tables, design.shape[1], prior_scale or {})

    features = [t.name.removeprefix(WIDE_PREFIX) for t in tables]  # a cross keeps its name
    oov = [oov_indices(logit_model, f) if f in oov_as_mean else 0 for f in features]
    served = served_means(design, sizes, dates, day_feature_min_days, oov, row_weights)

    def solve(strength: float) -> WideSolution:
        return solve_wide(design, sizes, labels, c=strength, seed=seed, served=served,
                          column_scale=scale)  # fmt: skip

    @functools.cache
    def held_design() -> sp.csr_matrix:
        """The held-out rows' design, built once for the grid and the refit's loss."""
        assert held is not None
        return wide_design(logit_model, held[0])

    scores: dict[str, float] = {}
    if len(c_grid) > 1 and held is not None:
        _, held_labels, correction = held
        rows = held_design()
        losses, solution = walk_c_grid(
            solve,
            lambda candidate: held_out_logloss(candidate, rows, held_labels, correction),
            c_grid,
            threads=grid_threads,
        )
        scores.update({f"wide_holdout_logloss_c{c:g}": loss for c, loss in losses.items()})
    else:
        solution = solve(c)
    named = named_tables(tables, refit_variance or {})
    if named:
        solution = refit_feature_weights(solution, design, sizes, labels, named)
        if held is not None:
            scores["wide_refit_holdout_logloss"] = held_out_logloss(
                solution, held_design(), held[1], held[2]
            )
    for table, block in zip(tables, solution.blocks, strict=True):
        table.set_weights([block.reshape(-1, 1)])
    if numeric is not None and solution.numeric is not None:
        numeric.set_weights([solution.numeric.reshape(-1, 1)])
    out = logit_model.get_layer("logit")
    kernel, _ = out.get_weights()
    out.set_weights([np.zeros_like(kernel), np.array([solution.intercept], dtype=np.float32)])
    for layer in [*tables, *([numeric] if numeric is not None else [])]:
        layer.trainable = False
    weights = np.concatenate(solution.blocks)
    return {
        "wide_intercept": solution.intercept,
        "wide_c": solution.c,
        "wide_nonzero": float(
            (weights != 0).sum()
            + (0 if solution.numeric is None else (solution.numeric != 0).sum())
        ),
        "wide_crosses": float(sum(t.name.startswith(WIDE_CROSS_PREFIX) for t in tables)),
        **scores,
    }
