"""The structured FM with per-ad effects, built from any dataset's feature spec (a real log too),
against the served ranker and its peers on D's rows (issue 10).

``bench.structured_fm`` reads the generated world's entity arrays, so it cannot say whether its
best learned slate (FM + per-ad random effect, 0.744 of the oracle at medium) is a model worth
serving on a log nobody generated. This bench builds the same model from the spec's columns:

- the query side: every categorical feature of the user and context roles except the user's own
  id and the day of the week (a vector per user from a handful of rows, and a vector per weekday
  fitted on one day, both measured to hurt in session 16);
- the ad side: every categorical feature of the ad role, the ad's id included;
- the hour of the day (``ctx__hour``, when the spec has it) as its own weight;
- a weight per value plus a rank-``d`` product of the two sides' summed vectors.

It is fitted by Adam on every training row of D's features folder. With ``--ad-effect-variance V``
each ad also gets a random effect fitted with the model's logit as offset
(``models.ranker.wide.random_effects``). Reported: AUC on D's evaluation rows with its interval,
and the paired AUC difference against the served ranker, beside the ranker, the LR and GBDT peers
and the ad prior, as D's evaluation stored them. With ``--blend W``, also the ensemble of the
served ranker and the FM (``(1 - W)`` times the ranker's logit plus ``W`` times the FM's).

:func:`fit_spec_fm` is the one home of this model: ``bench.slate_gap --fm`` ranks its replayed
requests with it, so the FM's slates are paired with the ranker's on the same requests.

Usage (needs D's features folder and D's evaluation)::

    python -m bench.spec_fm --root var/bench-quality/talkingdata --date 2017-11-09
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import evaluated_predictions, print_table, write_json
from models.feature_spec import ROLE_KEY
from models.ranker.fm import HOUR, fm_sides


def spec_sides(spec: Any) -> dict[str, list[str]]:
    """The categorical features of each side of the model, as the ranker's window FM reads them
    (:func:`models.ranker.fm.fm_sides`): ``user`` (the query) and ``ad``; the hour has a weight
    of its own (:func:`hours`), and :data:`models.ranker.fm.LEFT_OUT` are not read."""
    sides = fm_sides(spec)
    return {"user": sides.query, "ad": sides.ad}


def _text(column: pd.Series) -> pd.Series:
    """A categorical column as the strings both the fit and the scored rows read (a missing
    value as the empty string)."""
    return column.astype(str).where(column.notna(), "")


def vocabularies(frame: pd.DataFrame, features: list[str]) -> dict[str, pd.Index]:
    """Each feature's values in ``frame`` (the fit's rows), in order of first appearance."""
    return {name: pd.Index(pd.unique(_text(frame[name]))) for name in features}


def vocabulary_codes(
    frame: pd.DataFrame, features: list[str], vocab: dict[str, pd.Index]
) -> np.ndarray:
    """``frame``'s values of ``features`` as codes ``[rows, features]`` of ``vocab``; a value the
    vocabulary lacks reads as ``len(vocab[feature])``, the feature's one unknown code (its
    vector is never trained)."""
    columns = []
    for name in features:
        codes = vocab[name].get_indexer(_text(frame[name]))
        columns.append(np.where(codes < 0, len(vocab[name]), codes))
    return np.stack(columns, axis=1).astype(np.int32)


def blend_with_ranker(ranker_p: np.ndarray, fm_logit: np.ndarray, weight: float) -> np.ndarray:
    """The probability of ``(1 - weight) * logit(ranker) + weight * fm_logit``: an ensemble of
    the served ranker and the FM, judged by rank (AUC, slates), not by calibration."""
    p = np.clip(np.asarray(ranker_p, dtype=np.float64), 1e-7, 1 - 1e-7)
    logit = (1 - weight) * np.log(p / (1 - p)) + weight * np.asarray(fm_logit, dtype=np.float64)
    return 1 / (1 + np.exp(-logit))


def hours(frame: pd.DataFrame) -> np.ndarray:
    """The hour of day of each row (0 when the log has none)."""
    if HOUR not in frame:
        return np.zeros(len(frame), dtype=np.int32)
    hour = pd.to_numeric(frame[HOUR], errors="coerce").fillna(0).to_numpy()
    return (hour.astype(int) % 24).astype(np.int32)


@dataclass
class SpecFM:
    """A fitted spec FM: its sides, the fit's vocabularies, the Keras model and, per prior
    variance, each ad code's random effect (the unknown ad's is 0)."""

    sides: dict[str, list[str]]
    vocab: dict[str, pd.Index]
    model: Any
    effects: dict[float, np.ndarray] = field(default_factory=dict)

    def codes(self, frame: pd.DataFrame, side: str) -> np.ndarray:
        return vocabulary_codes(frame, self.sides[side], self.vocab)

    def inputs(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            "user": self.codes(frame, "user"),
            "placement": np.zeros((len(frame), 0), np.int32),
            "ad": self.codes(frame, "ad"),
            "hour": hours(frame),
        }

    def ad_codes(self, frame: pd.DataFrame) -> np.ndarray:
        """Each row's code of the ad's id (the index of its random effect)."""
        return vocabulary_codes(frame, [ROLE_KEY["ad"]], self.vocab)[:, 0]

    def logit(self, frame: pd.DataFrame, variance: float | None = None) -> np.ndarray:
        """The FM's logit of every row of ``frame`` (any frame with the spec's columns: the
        window, D's rows, a replayed request's candidates), plus the ad's random effect of
        prior ``variance`` when given."""
        out = self.model.predict(self.inputs(frame), batch_size=8192, verbose=0).astype(float)
        if variance is None:
            return out
        return out + self.effects[variance][self.ad_codes(frame)]


def fit_spec_fm(
    spec: Any,
    window: pd.DataFrame,
    *,
    dim: int = 8,
    l2: float = 1e-5,
    epochs: int = 3,
    seed: int = 7,
    variances: tuple[float, ...] = (),
) -> SpecFM:
    """The FM fitted by Adam on ``window`` (every training row: the spec's label and the
    sides' columns), then one per-ad random effect per prior variance with the FM's logit as
    offset (``models.ranker.wide.random_effects``)."""
    import keras
    import tensorflow as tf

    from bench.structured_fm import build_model
    from models.ranker.wide import random_effects

    sides = spec_sides(spec)
    vocab = vocabularies(window, [*sides["user"], *sides["ad"]])
    sizes = {side: [len(vocab[n]) + 1 for n in names] for side, names in sides.items()}
    keras.utils.set_random_seed(seed)
    model = build_model({**sizes, "placement": []}, dim, l2, price=False)
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    fm = SpecFM(sides, vocab, model)
    labels = window[spec.label].to_numpy().astype(np.float32)
    data = (
        tf.data.Dataset.from_tensor_slices((fm.inputs(window), labels))
        .shuffle(200_000, seed=seed)
        .batch(1024)
    )
    model.fit(data, epochs=epochs, verbose=0)
    if variances:
        offset = fm.logit(window)
        ads = fm.ad_codes(window)
        for variance in variances:
            fm.effects[variance] = random_effects(
                offset, ads, labels, len(vocab[ROLE_KEY["ad"]]) + 1, variance
            )
    return fm


def window_rows(features: Path, spec: Any, *, last_day: bool = True) -> pd.DataFrame:
    """Every training row of a features folder (the whole window), with the columns the FM
    reads; without ``last_day``, the window's last day (the ranker's held-out day) left out."""
    sides = spec_sides(spec)
    names = [*sides["user"], *sides["ad"], *([HOUR] if HOUR in spec.names else [])]
    rows = pd.read_parquet(features / "training" / "ranking", columns=[spec.label, "date", *names])
    if not last_day:
        rows = rows[rows["date"] < rows["date"].max()]
    return rows.drop(columns="date").reset_index(drop=True)


def slate_frames(
    args: argparse.Namespace, day: Any, date: dt.date
) -> tuple[Any, Any, pd.DataFrame, pd.DataFrame]:
    """The world, ``bench.slate_gap``'s sample of D's requests with every live ad, and the
    fields of those requests (user and placement entity tables; the hour's weight is the same
    for every ad of a request, so it is left out) and of the live ads (the ad entity table), as
    the model reads them. A user the tables lack has no profile: its fields read as missing."""
    from bench.common import generated_world
    from bench.match_ceiling import match_ceiling

    world = generated_world(args.root, "marketplace", "spec_fm")
    ceiling = match_ceiling(world, pd.read_parquet(day.eval_rows), date, args.slate, args.seed)
    entities = day.features / "entities"
    requests = ceiling.requests[["user_id", "placement_id"]].astype(str)
    request_frame = requests.merge(
        pd.read_parquet(entities / "users"), on="user_id", how="left"
    ).merge(pd.read_parquet(entities / "placements"), on="placement_id", how="left")
    ad_key = ROLE_KEY["ad"]
    ads = pd.read_parquet(entities / "ads").set_index(ad_key)
    ad_frame = ads.reindex(np.asarray(world.ad_ids)[ceiling.live]).rename_axis(ad_key)
    return world, ceiling, request_frame, ad_frame.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="state folder of the dataset")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--dim", type=int, default=8, help="rank of the query x ad product")
    parser.add_argument("--l2", type=float, default=1e-5, help="L2 on every embedding table")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ad-effect-variance",
        type=float,
        action="append",
        default=[],
        help="also score with a per-ad random effect of this prior variance (repeatable)",
    )
    parser.add_argument(
        "--slate",
        type=int,
        default=0,
        help="on a generated dataset, also the top-10 slate over every live ad for this many of "
        "D's requests (bench.slate_gap's sample), the fields read from the features folder's "
        "entity tables, as a share of the oracle",
    )
    parser.add_argument(
        "--blend",
        type=float,
        action="append",
        default=[],
        help="also the ensemble (1 - W) x ranker logit + W x FM logit on D's rows, the FM with "
        "the last --ad-effect-variance (repeatable; slates: bench.slate_gap --fm-blend)",
    )
    parser.add_argument("--out", help="bench/results/<out>.json (default spec_fm-<root>-<D>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from bench.structured_fm import slate_share
    from deepclick import layout
    from models.evaluation.ranking import auc, auc_difference_interval, auc_interval
    from models.feature_spec import load_feature_spec

    date = dt.date.fromisoformat(args.date)
    day = layout.DayLayout(args.root, date)
    spec = load_feature_spec(day.features)
    training = window_rows(day.features, spec)
    evaluation = pd.read_parquet(day.eval_rows, columns=list(training.columns))
    stored = evaluated_predictions(args.root, day.version, evaluation[spec.label].to_numpy())
    fm = fit_spec_fm(
        spec,
        training,
        dim=args.dim,
        l2=args.l2,
        epochs=args.epochs,
        seed=args.seed,
        variances=tuple(args.ad_effect_variance),
    )
    name_of: dict[str, float | None] = {f"FM, d {args.dim}": None}
    for variance in args.ad_effect_variance:
        name_of[f"FM + per-ad effect, variance {variance:g}"] = variance
    scores = {name: fm.logit(evaluation, v) for name, v in name_of.items()}
    blended = fm.logit(evaluation, args.ad_effect_variance[-1] if args.ad_effect_variance else None)
    for weight in args.blend:
        scores[f"ranker/FM blend, FM weight {weight:g}"] = blend_with_ranker(
            stored["ranker"].to_numpy(), blended, weight
        )
    slates: dict[str, dict[str, Any]] = {}
    if args.slate:
        world, ceiling, request_frame, ad_frame = slate_frames(args, day, date)
        query = fm.model.side("user", fm.codes(request_frame, "user")).numpy()
        ads = fm.model.side("ad", fm.codes(ad_frame, "ad")).numpy()
        base = ads[None, :, 0] + query[:, 1:] @ ads[:, 1:].T
        ad_codes = fm.ad_codes(ad_frame)
        for name, variance in name_of.items():
            effect = 0.0 if variance is None else fm.effects[variance][ad_codes][None, :]
            slates[name] = slate_share(world, ceiling, base + effect, args.seed)
    for column, label in (
        ("ranker", "served ranker"),
        ("logistic_regression", "LR peer"),
        ("gbdt", "GBDT peer"),
        ("ad_ctr_prior", "ad prior"),
    ):
        if column in stored:
            scores[label] = stored[column].to_numpy()
    y = evaluation[spec.label].to_numpy()
    rows = []
    for label, score in scores.items():
        low, high = auc_interval(y, score)
        difference = auc_difference_interval(y, score, stored["ranker"].to_numpy())
        rows.append(
            {
                "model": label,
                "auc": round(auc(y, score), 4),
                "auc_ci": f"[{low:.4f}, {high:.4f}]",
                "minus_ranker": "{:+.4f} [{:+.4f}, {:+.4f}]".format(*difference),
                **slates.get(label, {}),
            }
        )
    print_table(
        f"{args.root.name}, D {args.date}: {len(training):,} window rows, "
        f"{int(y.sum()):,} clicks on D",
        rows,
    )
    path = write_json(
        args.out or f"spec_fm-{args.root.name}-{date:%Y%m%d}", {**vars(args), "rows": rows}
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
