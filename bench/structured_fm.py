"""Does a model built with the world's own structure, learned from the window's rows alone,
reach the slate of the near-Bayes estimator? (issue 10)

``bench.match_ceiling``'s near-Bayes row knows every field's effect exactly and learns only each
entity's own part from the window. A model has to learn the fields' effects too. This bench
trains the simplest model whose form *is* the world's equation: a logistic regression over every
field (ids included) plus a rank-``d`` product of a query side (the user's profile fields and the
placement's fields and id) with an ad side (ad id, category, brand, campaign, advertiser), plus
the price taste (``pvalue × log price``), fitted by Adam with L2 on every impression of the
window. Its inputs are the observable fields only (read from the world's entity arrays, the same
values the logs' entity columns carry). Reported: AUC on D's rows and the top-10 slate over every
live ad for the requests of ``bench.slate_gap``, as a share of the oracle. With
``--ad-effect-variance V`` also the same model plus a per-ad random effect (GLMix: the model's
logit as offset, each ad's own effect at its posterior mode under a Gaussian prior of variance V,
``models.ranker.wide.random_effects``), which tells whether the fit under-learns the ads' own
quality.

Usage (needs D's features folder and the world's truth)::

    python -m bench.structured_fm --root var/bench-quality/medium --date 2024-01-08
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from bench.common import (
    add_generated_state_arguments,
    generated_world,
    print_table,
    write_json,
)


def field_codes(fields: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Each field's values as dense codes (``[entities, fields]``) and each field's vocabulary
    size."""
    codes, sizes = [], []
    for values in fields:
        vocabulary, index = np.unique(values, return_inverse=True)
        codes.append(index)
        sizes.append(len(vocabulary))
    return np.stack(codes, axis=1).astype(np.int32), sizes


def entity_fields(world: Any) -> dict[str, list[np.ndarray]]:
    """The observable fields of each side of the world's equation."""
    return {
        "user": [*world.user_profile, world.user_new_class],
        "placement": [
            world.placement_page,
            world.placement_slot,
            world.placement_position,
            np.arange(world.num_placements),
        ],
        "ad": [
            np.arange(world.num_ads),
            world.ad_cate,
            world.ad_brand,
            world.ad_campaign,
            world.ad_customer,
        ],
    }


def build_model(sizes: dict[str, list[int]], dim: int, l2: float, price: bool = True) -> Any:
    """logit = b + Σ field weights + hour + price taste + query(user, placement) · ad, with
    each field's embedding holding its weight in column 0 and its factor in the rest. Without
    ``price`` (a log with no price and taste) that term and its inputs are left out."""
    import keras
    import tensorflow as tf

    regularizer = keras.regularizers.L2(l2)

    class StructuredFM(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.tables = {
                side: [
                    keras.layers.Embedding(n, dim + 1, embeddings_regularizer=regularizer)
                    for n in sizes[side]
                ]
                for side in ("user", "placement", "ad")
            }
            self.hour = keras.layers.Embedding(24, 1)
            self.price = keras.layers.Dense(1) if price else None
            self.bias = self.add_weight(shape=(), initializer=keras.initializers.Constant(-3.5))

        def side(self, name: str, codes: Any) -> Any:
            return sum(table(codes[:, i]) for i, table in enumerate(self.tables[name]))

        def call(self, x: dict[str, Any]) -> Any:
            query = self.side("user", x["user"]) + self.side("placement", x["placement"])
            ad = self.side("ad", x["ad"])
            logit = (
                self.bias
                + query[:, 0]
                + ad[:, 0]
                + self.hour(x["hour"])[:, 0]
                + tf.reduce_sum(query[:, 1:] * ad[:, 1:], axis=1)
            )
            if self.price is None:
                return logit
            price = self.price(tf.concat([x["taste"] * x["log_price"], x["log_price"]], 1))
            return logit + price[:, 0]

    return StructuredFM()


def slate_share(world: Any, ceiling: Any, score: np.ndarray, seed: int) -> dict[str, Any]:
    """The top-10 of ``score`` (``[requests, live ads]``, the live ads of ``ceiling``) as a
    share of the oracle's slate with its bootstrap interval, and the picked ads' mean true
    quality, price and match terms (``bench.slate_gap.slate_terms``)."""
    from bench.match_ceiling import share_rows
    from bench.slate_gap import slate_terms
    from lifecycle.replay import SLOTS, true_slates

    top = np.argsort(-score, axis=1)[:, :SLOTS]
    picked = [np.asarray(world.ad_ids)[ceiling.live[t]].tolist() for t in top]
    (share,) = share_rows(ceiling, {"model": true_slates(world, ceiling.requests, picked)}, seed)
    return {
        "slate_of_oracle": share["of_oracle"],
        "slate_ci": f"[{share['ci_low']}, {share['ci_high']}]",
        **slate_terms(world, ceiling.requests, picked),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generated_state_arguments(parser)
    parser.add_argument("--dim", type=int, default=8, help="rank of the query x ad product")
    parser.add_argument("--l2", type=float, default=1e-5, help="L2 on every embedding table")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="replayed requests of D")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--last-days",
        type=int,
        default=0,
        help="fit on the window's last N days only (0: every day); the served ranker's network "
        "sees the last ranker_days",
    )
    parser.add_argument(
        "--ad-effect-variance",
        type=float,
        action="append",
        default=[],
        help="also score with a per-ad random effect of this prior variance fitted on the "
        "window's rows with the model's logit as offset (repeatable)",
    )
    parser.add_argument(
        "--out", help="bench/results/<out>.json (default structured_fm-<root folder>-<D>)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import tensorflow as tf

    from bench.auc_ceiling import ROW_COLUMNS, Rows, rows_of
    from bench.match_ceiling import match_ceiling
    from deepclick import layout
    from models.evaluation.ranking import auc, auc_interval
    from models.ranker.wide import random_effects

    date = dt.date.fromisoformat(args.date)
    world = generated_world(args.root, args.dataset, "structured_fm")
    day = layout.DayLayout(args.root, date)
    window = pd.read_parquet(day.features / "training" / "ranking", columns=[*ROW_COLUMNS, "date"])
    if args.last_days:
        window = window[window["date"].isin(sorted(window["date"].unique())[-args.last_days :])]
    training = rows_of(world, window[ROW_COLUMNS])
    eval_frame = pd.read_parquet(day.eval_rows)
    evaluation = rows_of(world, eval_frame[ROW_COLUMNS])
    encoded = {side: field_codes(f) for side, f in entity_fields(world).items()}
    codes = {side: c for side, (c, _) in encoded.items()}

    def inputs(rows: Rows) -> dict[str, np.ndarray]:
        return {
            "user": codes["user"][rows.user],
            "placement": codes["placement"][rows.placement],
            "ad": codes["ad"][rows.ad],
            "hour": rows.hour.astype(np.int32),
            "taste": (world.user_pvalue[rows.user] - 2.0).astype(np.float32)[:, None],
            "log_price": world.ad_log_price_z[rows.ad].astype(np.float32)[:, None],
        }

    keras.utils.set_random_seed(args.seed)
    model = build_model({s: n for s, (_, n) in encoded.items()}, args.dim, args.l2)
    model.compile(
        optimizer=keras.optimizers.Adam(0.003),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    data = (
        tf.data.Dataset.from_tensor_slices((inputs(training), training.label.astype(np.float32)))
        .shuffle(200_000, seed=args.seed)
        .batch(1024)
    )
    started = time.perf_counter()
    model.fit(data, epochs=args.epochs, verbose=0)
    seconds = time.perf_counter() - started
    scores = model.predict(inputs(evaluation), batch_size=8192, verbose=0).astype(float)

    ceiling = match_ceiling(world, eval_frame, date, args.requests, args.seed)
    live = ceiling.live
    ad = model.side("ad", codes["ad"][live]).numpy()
    query = (
        model.side("user", codes["user"][ceiling.users])
        + model.side("placement", codes["placement"][ceiling.placements])
    ).numpy()
    weights = model.price.kernel.numpy()[:, 0]
    taste = (world.user_pvalue[ceiling.users] - 2.0)[:, None]
    log_price = world.ad_log_price_z[live][None, :]
    score = (
        ad[None, :, 0] + query[:, 1:] @ ad[:, 1:].T + (weights[0] * taste + weights[1]) * log_price
    )
    name = f"structured FM, d {args.dim}, L2 {args.l2:g}, {args.epochs} epochs"
    scored = {name: (scores, score)}
    if args.ad_effect_variance:
        offset = model.predict(inputs(training), batch_size=8192, verbose=0).astype(float)
        for variance in args.ad_effect_variance:
            effect = random_effects(offset, training.ad, training.label, world.num_ads, variance)
            scored[f"{name} + per-ad random effect, variance {variance:g}"] = (
                scores + effect[evaluation.ad],
                score + effect[live][None, :],
            )
    rows = []
    for label, (row_scores, slate_scores) in scored.items():
        low, high = auc_interval(evaluation.label, row_scores)
        rows.append(
            {
                "model": label,
                "auc": round(auc(evaluation.label, row_scores), 4),
                "auc_ci": f"[{low:.4f}, {high:.4f}]",
                **slate_share(world, ceiling, slate_scores, args.seed),
                "fit_s": round(seconds, 1),
            }
        )
    print_table(f"{args.root.name}, D {args.date}: {len(training.label):,} window rows", rows)
    path = write_json(
        args.out or f"structured_fm-{args.root.name}-{date:%Y%m%d}", {**vars(args), "rows": rows}
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
