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
and the ad prior, as D's evaluation stored them.

Usage (needs D's features folder and D's evaluation)::

    python -m bench.spec_fm --root var/bench-quality/talkingdata --date 2017-11-09
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import evaluated_predictions, print_table, write_json
from models.feature_spec import ROLE_KEY
from models.ranker.inputs import SHARED_ROLES

LEFT_OUT = (ROLE_KEY["user"], "ctx__dow")
"""Categorical features the model leaves out (see the module doc)."""
HOUR = "ctx__hour"


def spec_sides(spec: Any) -> dict[str, list[str]]:
    """The categorical features of each side of the model: ``user`` (the query: the roles a
    request sends once, ``SHARED_ROLES``) and ``ad``; the hour and :data:`LEFT_OUT` are not
    among them."""
    taking_part = [f for f in spec.categorical if f.name not in (*LEFT_OUT, HOUR)]
    return {
        "user": [f.name for f in taking_part if f.role in SHARED_ROLES],
        "ad": [f.name for f in taking_part if f.role not in SHARED_ROLES],
    }


def side_codes(
    frames: list[pd.DataFrame], features: list[str]
) -> tuple[list[np.ndarray], list[int]]:
    """Each frame's values of ``features`` as dense codes ``[rows, features]`` shared across the
    frames (a value first seen in a later frame gets a code of its own, never trained), and
    each feature's number of codes."""
    lengths = [len(f) for f in frames]
    columns, sizes = [], []
    for name in features:
        codes, uniques = pd.factorize(pd.concat([f[name].astype(str) for f in frames]))
        columns.append(codes)
        sizes.append(len(uniques))
    stacked = np.stack(columns, axis=1).astype(np.int32)
    return np.split(stacked, np.cumsum(lengths)[:-1]), sizes


def hours(frame: pd.DataFrame) -> np.ndarray:
    """The hour of day of each row (0 when the log has none)."""
    if HOUR not in frame:
        return np.zeros(len(frame), dtype=np.int32)
    hour = pd.to_numeric(frame[HOUR], errors="coerce").fillna(0).to_numpy()
    return (hour.astype(int) % 24).astype(np.int32)


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
    parser.add_argument("--out", help="bench/results/<out>.json (default spec_fm-<root>-<D>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import tensorflow as tf

    from bench.structured_fm import build_model, slate_share
    from deepclick import layout
    from models.evaluation.ranking import auc, auc_difference_interval, auc_interval
    from models.feature_spec import load_feature_spec
    from models.ranker.wide import random_effects

    date = dt.date.fromisoformat(args.date)
    day = layout.DayLayout(args.root, date)
    spec = load_feature_spec(day.features)
    sides = spec_sides(spec)
    names = [*sides["user"], *sides["ad"], *([HOUR] if HOUR in spec.names else [])]
    training = pd.read_parquet(day.features / "training" / "ranking", columns=["label", *names])
    evaluation = pd.read_parquet(day.eval_rows, columns=["label", *names])
    stored = evaluated_predictions(args.root, day.version, evaluation["label"].to_numpy())
    extra_user: list[pd.DataFrame] = []
    extra_ad: list[pd.DataFrame] = []
    if args.slate:
        world, ceiling, request_frame, ad_frame = slate_frames(args, day, date)
        extra_user, extra_ad = [request_frame], [ad_frame]
    (user_fit, user_eval, *user_slate), user_sizes = side_codes(
        [training, evaluation, *extra_user], sides["user"]
    )
    (ad_fit, ad_eval, *ad_slate), ad_sizes = side_codes(
        [training, evaluation, *extra_ad], sides["ad"]
    )

    def inputs(user: np.ndarray, ad: np.ndarray, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            "user": user,
            "placement": np.zeros((len(frame), 0), np.int32),
            "ad": ad,
            "hour": hours(frame),
        }

    keras.utils.set_random_seed(args.seed)
    model = build_model(
        {"user": user_sizes, "placement": [], "ad": ad_sizes}, args.dim, args.l2, price=False
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    labels = training["label"].to_numpy().astype(np.float32)
    data = (
        tf.data.Dataset.from_tensor_slices((inputs(user_fit, ad_fit, training), labels))
        .shuffle(200_000, seed=args.seed)
        .batch(1024)
    )
    model.fit(data, epochs=args.epochs, verbose=0)
    eval_inputs = inputs(user_eval, ad_eval, evaluation)
    fm = f"FM, d {args.dim}"
    scores = {fm: model.predict(eval_inputs, batch_size=8192, verbose=0).astype(float)}
    ad_id = sides["ad"].index(ROLE_KEY["ad"])
    effects = {fm: np.zeros(ad_sizes[ad_id])}
    if args.ad_effect_variance:
        offset = model.predict(
            inputs(user_fit, ad_fit, training), batch_size=8192, verbose=0
        ).astype(float)
        for variance in args.ad_effect_variance:
            name = f"FM + per-ad effect, variance {variance:g}"
            effects[name] = random_effects(
                offset, ad_fit[:, ad_id], labels, ad_sizes[ad_id], variance
            )
            scores[name] = scores[fm] + effects[name][ad_eval[:, ad_id]]
    slates: dict[str, dict[str, Any]] = {}
    if args.slate:
        query = model.side("user", user_slate[0]).numpy()
        ads = model.side("ad", ad_slate[0]).numpy()
        base = ads[None, :, 0] + query[:, 1:] @ ads[:, 1:].T
        for name, effect in effects.items():
            slates[name] = slate_share(
                world, ceiling, base + effect[ad_slate[0][:, ad_id]][None, :], args.seed
            )
    for column, label in (
        ("ranker", "served ranker"),
        ("logistic_regression", "LR peer"),
        ("gbdt", "GBDT peer"),
        ("ad_ctr_prior", "ad prior"),
    ):
        if column in stored:
            scores[label] = stored[column].to_numpy()
    y = evaluation["label"].to_numpy()
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
