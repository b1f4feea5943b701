"""Why the ranker's slates are barely better than "most clicked" (issue 10): the gap, decomposed.

On one features folder and its day D, scorers fitted on the SAME rows the ranker fits on (its
days, minus the rows it holds out for calibration) rank every live ad for a seeded sample of D's
requests through the replay's serving path (``serving.ranking.rank`` over D's challenger release
with the candidate stage swapped for the whole live catalogue, as the replay's ``ranker_all_ads``
does), and the world's true click probabilities value their top-10 slates
(``models.evaluation.replay.replay_report``: share of the oracle, multiple of the most-clicked
ads, bootstrap intervals over requests). Each scorer also gets its AUC on D's rows, paired with
the ranker's, and its calibration.

The scorers, from what is served to what the data could allow at best:

- ``ranker``: the release's exported ranker (what the replay's ``ranker_all_ads`` measures);
- ``onehot_lr``: the one-hot LR peer (ids and features, no crosses);
- ``struct_lr``: a logistic regression with the crosses the world really has (user profile x ad
  category / brand, placement page type / slot x ad category / brand, pvalue x log price) plus
  the one-hot ids and features and the two two-tower similarities;
- ``truth_lr``: a logistic regression over the world's TRUE terms (user, placement and hour
  biases, ad quality, the price taste, and the 8 per-dimension products of the latent match):
  what perfect feature learning could reach from these rows (a handful of weights);
- ``truth_quality``, ``truth_quality_price``, ``truth_match``: no fitting, the ads ordered by one
  term of the true ad score alone (which term the slate needs);
- ``fm``, ``fm_effect_<V>``, ``ranker_fm_blend_<W>`` (with ``--fm``): ``bench.spec_fm``'s FM
  fitted on every window row, alone, with a per-ad effect of prior variance ``V``, and blended
  with the served ranker (``(1 - W)`` times its logit plus ``W`` times the FM's), paired with the
  served ranker on the same requests;
- ``oracle`` and ``popularity`` as in the replay.

Usage (the features, embeddings, index and ranker of D must be published; e.g. the state of
``python -m bench.quality --scale demo``)::

    python -m bench.slate_gap --root var/bench-quality/demo --date 2024-01-04 --requests 300

``--variant name:key=value,...`` adds a ranker retrained here with those ``RankerSettings``
(as in ``bench/ranker_split.py``; ``similarity=0``: without the two-tower scores, on every
training day), scored the same way. Each variant's slate and AUC are paired with the first
variant of its ranker seed, and that first one with the served ranker (:func:`paired_bases`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from bench.common import print_table, similarity_providers, write_json
from bench.ranker_variants import parse_variant, ranker_settings
from deepclick.settings import (
    MARKETPLACE_AD_FIELDS,
    MARKETPLACE_CONTEXT_FIELDS,
    MARKETPLACE_USER_FIELDS,
)
from models.evaluation.peers import PeerColumns, fit_logistic, inputs_frame
from models.evaluation.ranking import (
    auc,
    auc_difference_interval,
    auc_interval,
    calibration_interval,
    calibration_ratio,
)
from models.evaluation.replay import ORACLE, POPULARITY, replay_report, slate_ctr
from models.feature_spec import ROLE_KEY, FeatureSpec
from models.ranker.inputs import SIMILARITY_INPUTS

SLOTS = 10
RANKER_P = "_ranker_p"
"""The column that carries the served ranker's probability of each scored row (candidate rows
and D's rows alike), for the scorers that blend with it."""

Scorer = Callable[[pd.DataFrame], np.ndarray]


# --------------------------------------------------------------------------- scorers


def _column(spec: FeatureSpec, role_prefix: str, field: str) -> str:
    """The spec's column of a source field (``user__age_level``, ...); an error names it."""
    for f in spec.features:
        if f.name.startswith(role_prefix) and f.name.endswith(f"__{field}"):
            return f.name
    raise ValueError(f"feature spec {spec.version}: no {role_prefix}*__{field} column")


def truth_crosses(spec: FeatureSpec) -> list[tuple[str, str]]:
    """The categorical pairs whose product the world's latent match is made of."""
    prefixes = {f.name.split("__", 1)[0] for f in spec.features if "__" in f.name}
    user = next(p for p in ("user", "u") if p in prefixes)
    ctx = next(p for p in ("ctx", "context") if p in prefixes)
    ad = next(p for p in ("ad", "a") if p in prefixes)
    left = [_column(spec, user, f) for f in MARKETPLACE_USER_FIELDS] + [
        _column(spec, ctx, f) for f in MARKETPLACE_CONTEXT_FIELDS
    ]
    right = [_column(spec, ad, f) for f in MARKETPLACE_AD_FIELDS]
    return [(a, b) for a in left for b in right]


@dataclasses.dataclass
class CrossedLogistic:
    """One-hot LR over the spec's features, the ids, the given categorical crosses, the
    two-tower similarities and ``pvalue x log price``; L2 with ``C``."""

    columns: PeerColumns
    crosses: list[tuple[str, str]]
    price: str
    pvalue: str
    encoder: OneHotEncoder
    mean: np.ndarray
    scale: np.ndarray
    model: LogisticRegression
    sims: bool = True

    def _dense(self, frame: pd.DataFrame) -> np.ndarray:
        numbers = self.columns.numbers(frame)
        sims = np.stack(
            [
                pd.to_numeric(frame[n], errors="coerce")
                if self.sims and n in frame.columns
                else np.zeros(len(frame))
                for n in SIMILARITY_INPUTS
            ],
            1,
        ).astype(float)
        pvalue = pd.to_numeric(frame[self.pvalue], errors="coerce").fillna(2.0).to_numpy() - 2.0
        price = np.log1p(pd.to_numeric(frame[self.price], errors="coerce").fillna(0).to_numpy())
        return np.column_stack([numbers, np.nan_to_num(sims), pvalue * price])

    def _categories(self, frame: pd.DataFrame) -> pd.DataFrame:
        cats = self.columns.categories(frame)
        for name in ROLE_KEY.values():
            if name in frame.columns and name not in cats.columns:
                cats[name] = frame[name].astype(str).to_numpy()
        for a, b in self.crosses:
            cats[f"{a}*{b}"] = cats[a].astype(str) + "|" + cats[b].astype(str)
        return cats

    def design(self, frame: pd.DataFrame) -> sp.csr_matrix:
        dense = (self._dense(frame) - self.mean) / self.scale
        return sp.hstack(
            [self.encoder.transform(self._categories(frame)), sp.csr_matrix(dense)], format="csr"
        )

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(self.design(frame))[:, 1]


def fit_crossed(
    spec: FeatureSpec,
    rows: pd.DataFrame,
    crosses: list[tuple[str, str]],
    *,
    c: float = 0.1,
    sims: bool = True,
) -> CrossedLogistic:
    prefixes = {f.name.split("__", 1)[0] for f in spec.features if "__" in f.name}
    ad = next(p for p in ("ad", "a") if p in prefixes)
    user = next(p for p in ("user", "u") if p in prefixes)
    model = CrossedLogistic(
        PeerColumns.of(spec),
        crosses,
        _column(spec, ad, "price"),
        _column(spec, user, "pvalue_level"),
        OneHotEncoder(handle_unknown="ignore", dtype=np.float32),
        np.zeros(1),
        np.ones(1),
        LogisticRegression(),
        sims,
    )
    model.encoder.fit(model._categories(rows))
    dense = model._dense(rows)
    model.mean, model.scale = dense.mean(0), np.where(dense.std(0) > 0, dense.std(0), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.model = LogisticRegression(C=c, max_iter=500).fit(
            model.design(rows), rows[spec.label].to_numpy().astype(int)
        )
    return model


def truth_terms(world: Any, frame: pd.DataFrame) -> np.ndarray:
    """Per row the world's true logit terms: user, placement and hour biases, ad quality, the
    price taste, then the latent match split into its per-dimension products (``[n, 5 + d]``)."""
    from pipelines.simulate import index_of

    u = index_of(world, "user", frame[ROLE_KEY["user"]].astype(str).to_numpy())
    p = index_of(world, "placement", frame[ROLE_KEY["context"]].astype(str).to_numpy())
    a = index_of(world, "ad", frame[ROLE_KEY["ad"]].astype(str).to_numpy())
    hour = pd.to_numeric(frame.get("ctx__hour", 0), errors="coerce")
    h = np.nan_to_num(np.asarray(hour, dtype=float)).astype(int) % 24
    taste = world.user_pvalue[u].astype(float) - 2.0
    match = (world.user_factor[u] + world.placement_factor[p]) * world.ad_factor[a] * world.scale
    return np.column_stack(
        [
            world.user_bias[u],
            world.placement_bias[p],
            world.hour_effect[h],
            world.ad_quality[a],
            world.price_affinity * taste * world.ad_log_price_z[a],
            match,
        ]
    )


@dataclasses.dataclass
class TruthLogistic:
    """LR over :func:`truth_terms`: the ceiling of perfect feature learning on these rows."""

    world: Any
    model: LogisticRegression

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.model.predict_proba(truth_terms(self.world, frame))[:, 1]


def truth_term_scorer(world: Any, terms: Sequence[int]) -> Scorer:
    """Scores = the sum of the chosen :func:`truth_terms` columns (3 quality, 4 price, 5+ match)."""

    def score(frame: pd.DataFrame) -> np.ndarray:
        t = truth_terms(world, frame)
        cols = [c for c in terms if c < 5] + (list(range(5, t.shape[1])) if 5 in terms else [])
        return t[:, cols].sum(axis=1)

    return score


# --------------------------------------------------------------------------- the replay


class RecordingBackend:
    """A ranker backend that keeps each request's candidate rows (the frame every scorer reads:
    same features, same order) and answers ``rank`` with the release's own ranker."""

    kind = "slate_gap"

    def __init__(self, ranker: Any) -> None:
        self.ranker = ranker
        self.frame: pd.DataFrame | None = None
        self.ranker_scores: np.ndarray | None = None

    def predict(
        self,
        common: Mapping[str, np.ndarray],
        candidates: Mapping[str, np.ndarray],
        *,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        self.frame = inputs_frame(common, candidates)
        out = self.ranker.predict(common, candidates, timeout_s=timeout_s)
        self.ranker_scores = np.asarray(out, dtype=np.float64)
        return out


def top_slots(keys: np.ndarray, ids: np.ndarray) -> list[str]:
    """The ``SLOTS`` best ids by ``keys``; ties by candidate order (``rank``'s rule)."""
    retrieval = np.arange(len(keys), 0, -1, dtype=np.float64)
    return ids[np.lexsort((-retrieval, -keys))[:SLOTS]].tolist()


def all_ads_slates(
    release: Any,
    requests: pd.DataFrame,
    date: dt.date,
    catalogue: Sequence[str],
    scorers: Mapping[str, Scorer],
    *,
    chunk: int = 25,
) -> tuple[dict[str, list[list[str]]], dict[str, float]]:
    """Each request through ``rank`` with every live ad as candidates (the release's ranker
    answers); every other scorer ranks the same candidate rows, ``chunk`` requests per call (a
    Keras model call costs far more per call than per row). Returns per scorer its top-10 ids
    per request, and the seconds each scorer took."""
    from lifecycle.replay import FixedCandidates, served_slates

    backend = RecordingBackend(release.backend)
    swapped = dataclasses.replace(
        release, candidates=FixedCandidates(lambda _: catalogue), backend=backend
    )
    out: dict[str, list[list[str]]] = {name: [] for name in ["ranker", *scorers]}
    seconds = dict.fromkeys(scorers, 0.0)
    ids = np.asarray(catalogue, dtype=object)
    pending: list[pd.DataFrame] = []
    for i in range(len(requests)):
        served_slates(swapped, requests.iloc[i : i + 1], date, num_candidates=len(catalogue))
        if backend.frame is None or backend.ranker_scores is None:
            raise RuntimeError("the replay's request reached no ranker")
        out["ranker"].append(top_slots(backend.ranker_scores, ids))
        pending.append(backend.frame.assign(**{RANKER_P: backend.ranker_scores}))
        if len(pending) == chunk or i == len(requests) - 1:
            rows = pd.concat(pending, ignore_index=True)
            for name, scorer in scorers.items():
                tick = time.perf_counter()
                keys = np.asarray(scorer(rows), dtype=np.float64).reshape(len(pending), -1)
                seconds[name] += time.perf_counter() - tick
                out[name] += [top_slots(k, ids) for k in keys]
            pending = []
            print(f"  {i + 1}/{len(requests)} requests", flush=True)
    return out, {k: round(v, 1) for k, v in seconds.items()}


def fm_scorers(
    spec: FeatureSpec,
    features: Path,
    variances: Sequence[float],
    blends: Sequence[float],
    *,
    l2: float = 1e-5,
    epochs: int = 3,
    dim: int = 8,
    last_day: bool = True,
) -> dict[str, Scorer]:
    """``bench.spec_fm``'s FM fitted on every window row of ``features``: alone (``fm``), with
    each per-ad effect (``fm_effect_<V>``), and blended with the served ranker's logit
    (``ranker_fm_blend_<W>``, the FM with the last effect; the rows carry :data:`RANKER_P`)."""
    from bench.spec_fm import blend_with_ranker, fit_spec_fm, window_rows

    tick = time.perf_counter()
    rows = window_rows(features, spec, last_day=last_day)
    fm = fit_spec_fm(spec, rows, dim=dim, l2=l2, epochs=epochs, variances=tuple(variances))
    print(f"fm: fitted in {time.perf_counter() - tick:.0f} s", flush=True)

    def probability(variance: float | None) -> Scorer:
        return lambda rows: 1 / (1 + np.exp(-fm.logit(rows, variance)))

    def blend(weight: float, variance: float | None) -> Scorer:
        return lambda rows: blend_with_ranker(rows[RANKER_P], fm.logit(rows, variance), weight)

    out = {"fm": probability(None)}
    out.update({f"fm_effect_{v:g}": probability(v) for v in variances})
    last = variances[-1] if variances else None
    out.update({f"ranker_fm_blend_{w:g}": blend(w, last) for w in blends})
    return out


def paired_bases(variants: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Which scorer each ranker variant (``(name, seed)``, in command-line order) is paired
    with on the same requests: the first variant of its ranker seed (the same seed, so the
    difference is the setting's), or the served ``ranker`` for that first variant itself."""
    first_of_seed: dict[str, str] = {}
    bases: dict[str, str] = {}
    for name, seed in variants:
        bases[f"ranker_{name}"] = first_of_seed.get(seed, "ranker")
        first_of_seed.setdefault(seed, f"ranker_{name}")
    return bases


def slate_difference(
    slate: np.ndarray, base: np.ndarray, oracle: np.ndarray, *, samples: int = 500, seed: int = 7
) -> tuple[float, float, float]:
    """(share of oracle of ``slate``) − (that of ``base``) over the same requests, with a paired
    bootstrap 95% interval (the same resampled requests for all three)."""
    a, b, o = (slate_ctr(x, SLOTS) for x in (slate, base, oracle))
    draws = np.random.default_rng(seed).integers(0, len(a), size=(samples, len(a)))
    diff = (a[draws].mean(1) - b[draws].mean(1)) / o[draws].mean(1)
    low, high = np.quantile(diff, [0.025, 0.975])
    return float((a.mean() - b.mean()) / o.mean()), float(low), float(high)


def slate_terms(world: Any, requests: pd.DataFrame, slates: Sequence[Sequence[str]]) -> dict:
    """Mean true logit terms of the slates' ads: which term a scorer's picks have, which not."""

    flat = [(i, ad) for i, ads in enumerate(slates) for ad in list(ads)[:SLOTS]]
    rows = np.asarray([i for i, _ in flat])
    frame = pd.DataFrame(
        {
            ROLE_KEY["user"]: requests["user_id"].to_numpy()[rows],
            ROLE_KEY["context"]: requests["placement_id"].to_numpy()[rows],
            ROLE_KEY["ad"]: [ad for _, ad in flat],
            "ctx__hour": requests["hour"].to_numpy()[rows],
        }
    )
    t = truth_terms(world, frame)
    return {
        "quality": round(float(t[:, 3].mean()), 3),
        "price": round(float(t[:, 4].mean()), 3),
        "match": round(float(t[:, 5:].sum(1).mean()), 3),
    }


# --------------------------------------------------------------------------- main


def with_similarities(frame: pd.DataFrame, similarity: Any) -> pd.DataFrame:
    users, places, ads = (frame[ROLE_KEY[r]].astype(str).to_numpy() for r in ROLE_KEY)
    user_ad, context_ad = similarity.scores(users, places, ads)
    return frame.assign(**dict(zip(SIMILARITY_INPUTS, (user_ad, context_ad), strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="state folder of the dataset")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--requests", type=int, default=300, help="replayed requests of D")
    parser.add_argument(
        "--c", type=float, action="append", default=[], help="L2 C of the crossed LR (0.1)"
    )
    parser.add_argument(
        "--lr-all-days", action="store_true", help="also the crossed LR on every training day"
    )
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    parser.add_argument("--seed", type=int, default=7, help="request sample and bootstrap seed")
    parser.add_argument(
        "--skip-peers", action="store_true", help="no LR scorers (only rankers and truth terms)"
    )
    parser.add_argument(
        "--fm",
        action="store_true",
        help="also bench.spec_fm's FM, fitted on every window row (scorer fm)",
    )
    parser.add_argument(
        "--fm-effect-variance",
        type=float,
        action="append",
        default=[],
        help="with --fm: also the FM plus a per-ad effect of this prior variance (repeatable)",
    )
    parser.add_argument(
        "--fm-without-last-day",
        action="store_true",
        help="with --fm: fit it without the window's last day (the ranker's held-out day)",
    )
    parser.add_argument(
        "--fm-l2", type=float, default=1e-5, help="with --fm: L2 on the FM's tables (1e-5)"
    )
    parser.add_argument(
        "--fm-epochs", type=int, default=3, help="with --fm: Adam epochs over the window (3)"
    )
    parser.add_argument(
        "--fm-dim", type=int, default=8, help="with --fm: rank of the query x ad product (8)"
    )
    parser.add_argument(
        "--fm-blend",
        type=float,
        action="append",
        default=[],
        help="with --fm: also (1 - W) x the served ranker's logit + W x the FM's (with the last "
        "--fm-effect-variance) (repeatable)",
    )
    parser.add_argument("--out", default=None, help="bench/results/<out>.json")
    args = parser.parse_args(argv)

    from deepclick import layout
    from deepclick.layout import DayLayout, challengers_dir, version_for
    from deepclick.settings import Settings
    from lifecycle.release_writer import publish_release
    from lifecycle.replay import oracle_slates, popularity_lists, sample_requests, true_slates
    from lifecycle.stages import DayContext
    from models.feature_spec import load_feature_spec
    from models.ranker.train import load_split, on_served_scores, train_ranker
    from pipelines.retrieval_eval import _world, training_counts
    from pipelines.simulate import live_ads
    from pipelines.training_days import split_training_days
    from serving.release import load_release

    started = time.perf_counter()
    settings = Settings(root=args.root)
    date = dt.date.fromisoformat(args.date)
    version = version_for(date)
    day = DayLayout(settings.root, date, settings.predictor.model_name)
    features, embeddings, index, ranker_folder = (
        day.features,
        day.embeddings,
        day.index,
        day.ranker,
    )
    for folder in (features, embeddings, index, ranker_folder):
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not published: run D's daily stages up to the ranker")
    spec = load_feature_spec(features)
    ctx = DayContext(settings, date, settings.lifecycle.dataset, layout.raw_dir(settings.root))
    world = _world(ctx.truth_dir())
    if world is None:
        raise SystemExit(f"no world.npz under {ctx.truth_dir()}: slate_gap needs generated data")
    fit_similarity, similarity = similarity_providers(settings.root, version)
    days = split_training_days(
        spec.train_dates, settings.lifecycle.ranker_similarity, settings.lifecycle.ranker_days
    )
    split = load_split(spec, settings.ranker, days.ranker)
    fit = with_similarities(split.fit, fit_similarity)
    y_fit = fit[spec.label].to_numpy().astype(int)
    eval_rows = with_similarities(pd.read_parquet(features / "eval"), similarity)
    y = eval_rows[spec.label].to_numpy()
    print(
        f"fit rows {len(fit)} ({int(y_fit.sum())} clicks) of days {days.ranker}; "
        f"D rows {len(eval_rows)} ({int(y.sum())} clicks)",
        flush=True,
    )

    scorers: dict[str, Scorer] = {}
    truth_coef: list[float] = []
    if not args.skip_peers:
        onehot = fit_logistic(PeerColumns.of(spec), fit, y_fit)
        scorers["onehot_lr"] = onehot.predict
        for c in args.c or [0.1]:
            crossed = fit_crossed(spec, fit, truth_crosses(spec), c=c)
            scorers["struct_lr" if c == 0.1 else f"struct_lr_c{c:g}"] = crossed.predict
        if args.lr_all_days:  # every training day (no two-tower scores: the towers saw day 1)
            every = load_split(spec, settings.ranker, spec.train_dates).fit
            crossed = fit_crossed(spec, every, truth_crosses(spec), sims=False)
            scorers["struct_lr_all_days"] = crossed.predict
            print(f"struct_lr_all_days: {len(every)} rows", flush=True)
        terms = truth_terms(world, fit)
        truth = TruthLogistic(world, LogisticRegression(C=100.0, max_iter=1000).fit(terms, y_fit))
        scorers["truth_lr"] = truth.predict
        truth_coef = truth.model.coef_.reshape(-1).round(3).tolist()
    scorers["truth_quality"] = truth_term_scorer(world, [3])
    scorers["truth_quality_price"] = truth_term_scorer(world, [3, 4])
    scorers["truth_match"] = truth_term_scorer(world, [5])
    if args.fm:
        scorers.update(
            fm_scorers(
                spec,
                features,
                args.fm_effect_variance,
                args.fm_blend,
                l2=args.fm_l2,
                epochs=args.fm_epochs,
                dim=args.fm_dim,
                last_day=not args.fm_without_last_day,
            )
        )
    base_of = paired_bases(
        [
            (name, pairs.get("seed", str(settings.ranker.seed)))
            for name, pairs in map(parse_variant, args.variant)
        ]
    )
    fits_of: dict[str, dict[str, float]] = {}  # variant -> its wide and FM fits' metrics
    for variant in args.variant:
        name, pairs = parse_variant(variant)
        # similarity=0: no two-tower scores, so the ranker learns from every training day
        use_similarity = pairs.pop("similarity", "1") == "1"
        own = days if use_similarity else split_training_days(spec.train_dates, False, 0)
        cfg = ranker_settings(settings.ranker, pairs)
        trained = train_ranker(
            spec,
            cfg,
            similarity=fit_similarity if own.similarity else None,
            progress=False,
            dates=own.ranker,
        )
        scorers[f"ranker_{name}"] = on_served_scores(trained, similarity).predict
        fits_of[f"ranker_{name}"] = {
            k: v for k, v in trained.metrics.items() if k.startswith(("wide_", "fm_"))
        }
        print(f"trained ranker_{name}: {pairs}; {fits_of[f'ranker_{name}']}", flush=True)

    folder = publish_release(
        settings,
        features,
        embeddings,
        index,
        ranker_folder,
        version=version,
        update_current=False,
        parent=challengers_dir(settings.root),
    )
    release = load_release(folder, settings)
    try:
        live = set(world.ad_ids[live_ads(world, date)].tolist())
        catalogue = [release.candidates.index_id(r) for r in range(len(release.candidates.index))]
        catalogue = [a for a in catalogue if a in live]
        overall, _ = popularity_lists(training_counts(features), catalogue)
        requests = sample_requests(eval_rows, args.requests, seed=args.seed)
        tick = time.perf_counter()
        ids, scorer_seconds = all_ads_slates(release, requests, date, catalogue, scorers)
        replay_seconds = time.perf_counter() - tick
    finally:
        release.close()

    from models.ranker.predictor import InProcessPredictor

    ranker_p = InProcessPredictor(ranker_folder).predict_frame(eval_rows, similarity=similarity)
    eval_rows[RANKER_P] = np.asarray(ranker_p, dtype=np.float64)
    oracle_ids, oracle_p = oracle_slates(world, requests, date)
    slates: dict[str, np.ndarray] = {ORACLE: oracle_p}
    slates[POPULARITY] = true_slates(world, requests, [overall[:SLOTS]] * len(requests))
    for name, lists in ids.items():
        slates[name] = true_slates(world, requests, lists)
    report = replay_report(slates, bootstrap=500, seed=args.seed)

    probabilities = {"ranker": np.asarray(ranker_p, dtype=float)}
    for name, scorer in scorers.items():
        if not name.startswith("truth_") or name == "truth_lr":
            probabilities[name] = np.asarray(scorer(eval_rows), dtype=float)
    for name in scorers:
        if name.startswith("truth_") and name != "truth_lr":
            probabilities[name] = np.asarray(scorers[name](eval_rows), dtype=float)
    from pipelines.simulate import index_of, true_click_probability

    probabilities[ORACLE] = true_click_probability(
        world,
        index_of(world, "user", eval_rows[ROLE_KEY["user"]].astype(str).to_numpy()),
        index_of(world, "placement", eval_rows[ROLE_KEY["context"]].astype(str).to_numpy()),
        index_of(world, "ad", eval_rows[ROLE_KEY["ad"]].astype(str).to_numpy()),
        np.nan_to_num(pd.to_numeric(eval_rows["ctx__hour"], errors="coerce")).astype(int) % 24,
    )
    rows = []
    for name in [ORACLE, *ids, POPULARITY]:
        top = report["systems"][name]["top_10"]
        row: dict[str, Any] = {
            "scorer": name,
            "top10_ctr": round(top["expected_ctr"], 4),
            "of_oracle": _fmt(top.get("share_of_oracle"), top.get("share_of_oracle_ci95")),
            "x_most_clicked": _fmt(top.get("x_popularity"), top.get("x_popularity_ci95")),
        }
        if name in probabilities:
            p = probabilities[name]
            low, high = auc_interval(y, p)
            row["auc_D"] = f"{auc(y, p):.4f} [{low:.4f}, {high:.4f}]"
            diff = auc_difference_interval(y, p, probabilities["ranker"])
            row["auc_minus_ranker"] = f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]"
            if name not in ("truth_quality", "truth_quality_price", "truth_match"):
                ratio = calibration_ratio(y, p)
                c_low, c_high = calibration_interval(y, p)
                row["calibration"] = f"{ratio:.3f} [{c_low:.3f}, {c_high:.3f}]"
        base = base_of.get(name, "ranker")
        if name not in (ORACLE, POPULARITY, base):
            d = slate_difference(slates[name], slates[base], slates[ORACLE])
            row["slate_minus_base"] = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] vs {base}"
            if name in probabilities and base in probabilities:
                a = auc_difference_interval(y, probabilities[name], probabilities[base])
                row["auc_minus_base"] = f"{a[0]:+.4f} [{a[1]:+.4f}, {a[2]:+.4f}]"
        if name != ORACLE:
            terms_of = slate_terms(
                world, requests, ids.get(name) or [overall[:SLOTS]] * len(requests)
            )
        else:
            terms_of = slate_terms(world, requests, oracle_ids)
        row.update(terms_of)
        rows.append(row)
    print_table(
        f"slate gap on {args.date}: {len(requests)} requests x {len(catalogue)} live ads; "
        f"fit {len(fit)} rows",
        rows,
    )
    out = args.out or f"slate_gap-{version}"
    path = write_json(
        out,
        {
            "root": str(args.root),
            "date": args.date,
            "requests": len(requests),
            "live_ads": len(catalogue),
            "fit_rows": len(fit),
            "fit_clicks": int(y_fit.sum()),
            "ranker_days": list(days.ranker),
            "variants": args.variant,
            "fm": (
                {
                    "l2": args.fm_l2,
                    "epochs": args.fm_epochs,
                    "dim": args.fm_dim,
                    "effect_variances": args.fm_effect_variance,
                    "blends": args.fm_blend,
                    "without_last_day": args.fm_without_last_day,
                }
                if args.fm
                else None
            ),
            "truth_lr_coef": truth_coef,
            "rows": rows,
            "base_of": base_of,
            "fits": fits_of,
            "replay": report,
            "replay_seconds": round(replay_seconds, 1),
            "scorer_seconds": scorer_seconds,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(f"written to {path}")
    return 0


def _fmt(value: float | None, ci: Sequence[float] | None) -> str | None:
    if value is None:
        return None
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


if __name__ == "__main__":
    raise SystemExit(main())
