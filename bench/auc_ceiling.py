"""How close any ranker can come to the oracle AUC with what the window's logs show (issue 10).

The oracle AUC scores D's rows by the world's true click logit, which holds a part of every
user, placement and ad that no field shows (``pipelines.simulate.world``: a bias and a latent
factor drawn per entity beside the ones its profile, page type, slot, category and brand
explain). A ranker can learn those parts only from the entity's own impressions in the window. This
bench scores D's rows by the world's very equation with each entity's own part

- known exactly (the oracle), or
- left out: the fields' projection alone (``bench.match_ceiling.project``; what a model
  without any history reaches at best), or
- estimated from the training window's clicks as its posterior mode under the world's own prior
  (a Gaussian of the residuals' variance; Newton steps per entity, users, placements and ads
  fitted in turn with the others held at their current estimates).

The last is a near-Bayes estimator that knows the world's equation and every field's effect
exactly and learns only the entities' own parts from the window: what the ranker could reach if
it modelled the world perfectly. It is not a strict bound (a posterior mode, Gaussian priors for
the heavy-tailed ad quality), but a ranker trained on the same rows would have to beat the
world's own structure to exceed it; a last row checks that, adding the ranker's logit to the
ceiling's at its best weight on D. D's evaluation rows are scored as the evaluation scored them,
so the ranker and its peers stand beside the ceilings on the same rows (paired bootstrap).

The same estimates also rank slates: for the replay's requests (``--slates``, the same seeded
sample of D's impressions the evaluation's replay draws), each set of parts picks its 10 best live
ads by the world's equation, and the truth values them (top-10 expected CTR as a share of the
oracle's, bootstrap over requests). The ceiling's share is what a ranker that modelled the world
perfectly could serve from these rows: the yardstick for issue 10's slate targets, beside the
evaluation's own replay of the served release on the same requests.

Usage (needs D's features and evaluation folders and the world's truth)::

    python -m bench.auc_ceiling --root var/bench-quality/large --date 2024-01-08
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from bench.common import (
    add_generated_state_arguments,
    evaluated_predictions,
    generated_world,
    print_table,
    write_json,
)
from bench.match_ceiling import project

SIDES = ("user", "placement", "ad")
ROW_COLUMNS = ["label", "user_id", "placement_id", "ad_id", "ctx__hour"]


@dataclass(frozen=True)
class Parts:
    """The per-entity terms of the world's logit: each side's bias and latent factor."""

    user_bias: np.ndarray
    user_factor: np.ndarray
    placement_bias: np.ndarray
    placement_factor: np.ndarray
    ad_bias: np.ndarray
    ad_factor: np.ndarray

    def bias(self, side: str) -> np.ndarray:
        return getattr(self, f"{side}_bias")

    def factor(self, side: str) -> np.ndarray:
        return getattr(self, f"{side}_factor")

    def with_side(self, side: str, bias: np.ndarray, factor: np.ndarray) -> Parts:
        return dataclasses.replace(self, **{f"{side}_bias": bias, f"{side}_factor": factor})


@dataclass(frozen=True)
class Rows:
    """Impressions as world indices: user, placement, ad, UTC hour, and the click."""

    user: np.ndarray
    placement: np.ndarray
    ad: np.ndarray
    hour: np.ndarray
    label: np.ndarray

    def index(self, side: str) -> np.ndarray:
        return getattr(self, side)


def true_parts(world: Any) -> Parts:
    return Parts(
        user_bias=world.user_bias.astype(float),
        user_factor=world.user_factor.astype(float),
        placement_bias=world.placement_bias.astype(float),
        placement_factor=world.placement_factor.astype(float),
        ad_bias=world.ad_quality.astype(float),
        ad_factor=world.ad_factor.astype(float),
    )


def field_parts(world: Any) -> Parts:
    """Every entity's bias and factor replaced by their least-squares fit on its fields."""
    fields = {
        "user": world.user_profile,
        "placement": [world.placement_page, world.placement_slot, world.placement_position],
        "ad": [world.ad_cate, world.ad_brand],
    }
    truth = true_parts(world)
    projected = {}
    for side, columns in fields.items():
        both = np.column_stack([truth.bias(side), truth.factor(side)])
        fit = project(both, columns)
        projected[f"{side}_bias"], projected[f"{side}_factor"] = fit[:, 0], fit[:, 1:]
    return Parts(**projected)


def logit(world: Any, parts: Parts, rows: Rows) -> np.ndarray:
    """The world's click logit of ``rows`` with ``parts`` in place of the true entity terms."""
    u, p, a = rows.user, rows.placement, rows.ad
    query = parts.user_factor[u] + parts.placement_factor[p]
    return (
        world.intercept
        + parts.user_bias[u]
        + parts.placement_bias[p]
        + world.hour_effect[rows.hour]
        + parts.ad_bias[a]
        + world.price_affinity * (world.user_pvalue[u] - 2.0) * world.ad_log_price_z[a]
        + world.scale * np.einsum("ij,ij->i", query, parts.ad_factor[a])
    )


def own_part_variance(world: Any, truth: Parts, fields: Parts, side: str) -> np.ndarray:
    """The prior variance of one entity's own part, [bias, factor dims]: the residuals' spread
    (the factor's dimensions pooled, as the world draws them alike)."""
    bias = float(np.var(truth.bias(side) - fields.bias(side)))
    factor = float(np.var(truth.factor(side) - fields.factor(side)))
    return np.array([bias] + [factor] * world.latent_dim)


def _design(world: Any, parts: Parts, rows: Rows, side: str) -> np.ndarray:
    """Each row's derivative of the logit by the side's own [bias, factor]."""
    if side == "ad":
        partner = parts.user_factor[rows.user] + parts.placement_factor[rows.placement]
    else:
        partner = parts.ad_factor[rows.ad]
    return np.column_stack([np.ones(len(rows.label)), world.scale * partner])


def fit_side(
    world: Any,
    parts: Parts,
    fields: Parts,
    rows: Rows,
    side: str,
    prior: np.ndarray,
    own: np.ndarray,
    steps: int,
) -> np.ndarray:
    """The side's own parts (``[entities, 1 + d]``) at their posterior mode given ``rows``'
    clicks, everything else of ``parts`` held fixed (:func:`models.ranker.wide.random_slopes`,
    ``steps`` Newton steps from ``own``)."""
    from models.ranker.wide import random_slopes

    x = _design(world, parts, rows, side)
    base = logit(world, parts.with_side(side, fields.bias(side), fields.factor(side)), rows)
    n = len(fields.bias(side))
    return random_slopes(base, rows.index(side), x, rows.label, n, prior, start=own, steps=steps)


def learned_parts(
    world: Any, truth: Parts, fields: Parts, rows: Rows, sides: tuple[str, ...], rounds: int
) -> Parts:
    """``truth`` with ``sides``' own parts estimated from ``rows`` (fields plus posterior mode),
    the sides fitted in turn for ``rounds`` rounds."""
    parts = truth
    own, prior = {}, {}
    for side in sides:
        own[side] = np.zeros((len(fields.bias(side)), 1 + world.latent_dim))
        prior[side] = own_part_variance(world, truth, fields, side)
        parts = parts.with_side(side, fields.bias(side), fields.factor(side))
    for _ in range(rounds):
        for side in sides:
            own[side] = fit_side(world, parts, fields, rows, side, prior[side], own[side], steps=3)
            parts = parts.with_side(
                side, fields.bias(side) + own[side][:, 0], fields.factor(side) + own[side][:, 1:]
            )
    return parts


def ad_posterior_covariance(world: Any, parts: Parts, rows: Rows, prior: np.ndarray) -> np.ndarray:
    """``[ads, 1 + d, 1 + d]``: each ad's own [bias, factor] posterior covariance at ``parts``
    (Laplace: the inverse of the log posterior's Hessian; an ad without rows keeps its prior)."""
    from models.ranker.wide import per_value_gram

    x = _design(world, parts, rows, "ad")
    p = 1.0 / (1.0 + np.exp(-logit(world, parts, rows)))
    gram = per_value_gram(rows.ad, p * (1.0 - p), x, len(parts.ad_bias))
    return np.linalg.inv(gram + np.diag(1 / prior))


def posterior_mean_slates(
    world: Any, parts: Parts, covariance: np.ndarray, requests: pd.DataFrame, date: dt.date
) -> list[list[str]]:
    """Top-10 ads per request by the posterior *mean* of the click probability instead of its
    mode: each pair's logit plus half its variance, ``[1, s·q] Σ_ad [1, s·q]ᵀ / 2`` (the
    lognormal approximation for small p). The Bayes choice for expected clicks if the prior
    were the world's; the world's ad quality is heavy-tailed, which a Gaussian prior is not."""
    from lifecycle.replay import SLOTS
    from pipelines.simulate import index_of, live_ads
    from pipelines.simulate.world import ad_score

    users = index_of(world, "user", requests["user_id"].to_numpy(dtype=str))
    placements = index_of(world, "placement", requests["placement_id"].to_numpy(dtype=str))
    believed, ads = with_parts(world, parts), live_ads(world, date)
    picked = []
    for start in range(0, len(users), 100):
        u, p = users[start : start + 100], placements[start : start + 100]
        query = parts.user_factor[u] + parts.placement_factor[p]
        z = np.concatenate([np.ones((len(u), 1)), world.scale * query], axis=1)
        spread = np.einsum("ri,aij,rj->ra", z, covariance[ads], z, optimize=True)
        score = ad_score(believed, u, p, ads, all_pairs=True) + 0.5 * spread
        picked.append(ads[np.argsort(-score, axis=1, kind="stable")[:, :SLOTS]])
    return world.ad_ids[np.concatenate(picked)].tolist()


def rows_of(world: Any, frame: pd.DataFrame) -> Rows:
    from pipelines.simulate import index_of

    return Rows(
        user=index_of(world, "user", frame["user_id"].to_numpy(dtype=str)),
        placement=index_of(world, "placement", frame["placement_id"].to_numpy(dtype=str)),
        ad=index_of(world, "ad", frame["ad_id"].to_numpy(dtype=str)),
        hour=frame["ctx__hour"].to_numpy(dtype=np.int64),
        label=frame["label"].to_numpy(dtype=float),
    )


def auc_rows(
    label: np.ndarray, scores: dict[str, np.ndarray], reference: str, samples: int
) -> list[dict[str, Any]]:
    """AUC of every scorer with its bootstrap interval and its paired difference from
    ``reference`` (same resamples, so far tighter than the two intervals)."""
    from models.evaluation.ranking import auc, auc_difference_interval, auc_interval

    out = []
    for name, score in scores.items():
        low, high = auc_interval(label, score, samples=samples)
        row = {"scorer": name, "auc": round(auc(label, score), 4)}
        row.update(ci_low=round(low, 4), ci_high=round(high, 4))
        if name != reference:
            diff, d_low, d_high = auc_difference_interval(
                label, score, scores[reference], samples=samples
            )
            row.update(vs_ranker=round(diff, 4), vs_low=round(d_low, 4), vs_high=round(d_high, 4))
        out.append(row)
    return out


RANKER = "the ranker (evaluation's scores)"
CEILING = "equation known, every own part learned (the ceiling)"
MIX_WEIGHTS = (0.1, 0.25, 0.5, 1.0)
POSTERIOR_MEAN = "the ceiling, ranked by the posterior mean (every pair's variance / 2 added)"
POSTERIOR_MEAN_BIAS = "the ceiling, ranked by the posterior mean of the ads' biases alone"


def ranker_beside(
    label: np.ndarray, ceiling: np.ndarray, ranker: np.ndarray
) -> tuple[float, np.ndarray]:
    """The ceiling's logit plus the ranker's logit at the weight of :data:`MIX_WEIGHTS` with the
    best AUC on these very rows. A check of the ceiling, optimistic by construction: if the ranker
    knew something the ceiling's estimator does not, this would rise well above the ceiling."""
    from models.evaluation.ranking import auc

    p = np.clip(ranker, 1e-7, 1 - 1e-7)
    ranker_logit = np.log(p / (1 - p))
    tried = {w: ceiling + w * ranker_logit for w in MIX_WEIGHTS}
    best = max(tried, key=lambda w: auc(label, tried[w]))
    return best, tried[best]


def with_parts(world: Any, parts: Parts) -> Any:
    """``world`` with ``parts`` in place of its entity terms: the world a scorer believes in."""
    return dataclasses.replace(
        world,
        user_bias=parts.user_bias,
        user_factor=parts.user_factor,
        placement_bias=parts.placement_bias,
        placement_factor=parts.placement_factor,
        ad_quality=parts.ad_bias,
        ad_factor=parts.ad_factor,
    )


def slate_shares(
    world: Any,
    believed: dict[str, Parts],
    requests: pd.DataFrame,
    date: dt.date,
    bootstrap: int,
    extra: dict[str, list[list[str]]] | None = None,
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """Top-10 slates of every set of ``believed`` parts over D's live ads, valued by the truth:
    each one's expected CTR and share of the oracle's, with paired bootstrap intervals.
    ``extra``: further slates already chosen (name → ad ids per request). With ``reference``
    (a name of ``believed``), each row also gets its paired difference from that one's share."""
    from lifecycle.replay import SLOTS, oracle_slates, true_slates
    from models.evaluation.replay import ORACLE, replay_report, slate_ctr
    from pipelines.simulate import best_ads, index_of

    users = index_of(world, "user", requests["user_id"].to_numpy(dtype=str))
    placements = index_of(world, "placement", requests["placement_id"].to_numpy(dtype=str))
    hours = requests["hour"].to_numpy(dtype=np.int64)
    slates = {ORACLE: oracle_slates(world, requests, date)[1]}
    for name, parts in believed.items():
        picked, _ = best_ads(with_parts(world, parts), users, placements, hours, SLOTS, day=date)
        slates[name] = true_slates(world, requests, world.ad_ids[picked].tolist())
    for name, ids in (extra or {}).items():
        slates[name] = true_slates(world, requests, ids)
    report = replay_report(slates, bootstrap=bootstrap)
    rows = [share_row(name, entry[f"top_{SLOTS}"]) for name, entry in report["systems"].items()]
    if reference is not None:
        oracle = slate_ctr(slates[ORACLE], SLOTS).mean()
        base = slate_ctr(slates[reference], SLOTS)
        draws = np.random.default_rng(7).integers(0, len(base), size=(bootstrap, len(base)))
        for row in rows:
            gap = (slate_ctr(slates[row["slates of"]], SLOTS) - base) / oracle
            low, high = np.quantile(gap[draws].mean(axis=1), [0.025, 0.975])
            row.update(vs_ceiling=round(float(gap.mean()), 4), vs_low=round(float(low), 4))
            row["vs_high"] = round(float(high), 4)
    return rows


def share_row(name: str, top: dict[str, Any]) -> dict[str, Any]:
    """One table row from a replay report's top-10 entry (``replay_report``'s layout)."""
    low, high = top["share_of_oracle_ci95"]
    return {
        "slates of": name,
        "top10_ctr": round(top["expected_ctr"], 4),
        "share_of_oracle": round(top["share_of_oracle"], 3),
        "ci_low": round(low, 3),
        "ci_high": round(high, 3),
    }


def served_replay(root: Any, version: str) -> list[dict[str, Any]]:
    """The evaluation's own replay of the served release (the same requests): its top-10 share
    of the oracle per system, to stand beside the ceiling's slates (unpaired)."""
    import json

    from deepclick import layout
    from lifecycle.replay import REPORT_FILE

    path = layout.evaluations_dir(root) / version / "replay" / REPORT_FILE
    if not path.is_file():
        return []
    systems = json.loads(path.read_text())["systems"]
    return [
        share_row(f"served release's replay: {name}", systems[name]["top_10"])
        for name in ("deepclick", "ranker_all_ads", "popularity")
        if name in systems
    ]


def main(argv: list[str] | None = None) -> int:
    from deepclick import layout

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generated_state_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over users, placements, ads")
    parser.add_argument("--bootstrap", type=int, default=100, help="AUC resamples")
    parser.add_argument(
        "--slates",
        type=int,
        default=1000,
        help="replay requests whose top-10 slates each set of parts ranks (0: none); 1000 is "
        "the evaluation's replay, so its requests are the same",
    )
    parser.add_argument(
        "--posterior-mean",
        action="store_true",
        help="also rank the ceiling's slates by the posterior mean of p, not its mode",
    )
    args = parser.parse_args(argv)
    console = Console()

    date = dt.date.fromisoformat(args.date)
    world = generated_world(args.root, args.dataset, "auc_ceiling")
    day = layout.DayLayout(args.root, date)
    eval_frame = pd.read_parquet(day.eval_rows, columns=["event_id", *ROW_COLUMNS])
    predictions = evaluated_predictions(args.root, day.version, eval_frame["label"].to_numpy())
    evaluation = rows_of(world, eval_frame)
    truth, fields = true_parts(world), field_parts(world)
    truth_p = pd.read_parquet(layout.truth_dir(args.root, args.dataset) / f"{date}.parquet")
    oracle = logit(world, truth, evaluation)
    # The equation must be the world's: the oracle's logit against the simulator's own p_click.
    p_click = truth_p.set_index("impression_id")["p_click"].reindex(eval_frame["event_id"])
    gap = np.abs(1.0 / (1.0 + np.exp(-oracle)) - p_click.to_numpy()).max()
    if not gap < 1e-4:
        raise SystemExit(f"the oracle's equation is not the world's: max |p - p_click| {gap}")

    console.print("reading the training window's rows")
    training = rows_of(
        world, pd.read_parquet(day.features / "training" / "ranking", columns=ROW_COLUMNS)
    )
    scores: dict[str, np.ndarray] = {RANKER: predictions["ranker"].to_numpy()}
    scores["one-hot LR (peer)"] = predictions["logistic_regression"].to_numpy()
    scores["GBDT (peer)"] = predictions["gbdt"].to_numpy()
    scores["oracle: every entity's own part known"] = oracle
    scores["no entity's own part (fields only)"] = logit(world, fields, evaluation)
    believed = {"no entity's own part (fields only)": fields}
    for side in SIDES:
        without = truth.with_side(side, fields.bias(side), fields.factor(side))
        scores[f"all known but the {side}s' own parts"] = logit(world, without, evaluation)
        console.print(f"estimating the {side}s' own parts from the window")
        learned = learned_parts(world, truth, fields, training, (side,), rounds=1)
        scores[f"all known, the {side}s' own parts learned"] = logit(world, learned, evaluation)
        believed[f"all known, the {side}s' own parts learned"] = learned
    console.print("estimating every entity's own part from the window")
    learned = learned_parts(world, truth, fields, training, SIDES, rounds=args.rounds)
    believed[CEILING] = learned
    believed["the ceiling, ads' latent factors from their fields only"] = dataclasses.replace(
        learned, ad_factor=fields.ad_factor
    )
    believed["the ceiling, ads' biases from their fields only"] = dataclasses.replace(
        learned, ad_bias=fields.ad_bias
    )
    ceiling = logit(world, learned, evaluation)
    scores[CEILING] = ceiling
    weight, mixed = ranker_beside(evaluation.label, ceiling, scores[RANKER])
    scores[f"the ceiling + {weight} x the ranker's logit (best weight on D: a check)"] = mixed
    console.print(f"AUC with {args.bootstrap} bootstrap resamples")
    rows = auc_rows(evaluation.label, scores, RANKER, args.bootstrap)
    print_table(
        f"AUC ceilings on {args.date}: {len(evaluation.label):,} rows, "
        f"{int(evaluation.label.sum()):,} clicks; window {len(training.label):,} rows",
        rows,
    )
    slates: list[dict[str, Any]] = []
    if args.slates > 0:
        from lifecycle.replay import sample_requests

        console.print(f"top-10 slates of {args.slates:,} replay requests over D's live ads")
        requests = sample_requests(pd.read_parquet(day.eval_rows), args.slates)
        extra: dict[str, list[list[str]]] = {}
        if args.posterior_mean:
            console.print("the ads' posterior covariance at the ceiling's estimate")
            prior = own_part_variance(world, truth, fields, "ad")
            covariance = ad_posterior_covariance(world, learned, training, prior)
            believed[POSTERIOR_MEAN_BIAS] = dataclasses.replace(
                learned, ad_bias=learned.ad_bias + 0.5 * covariance[:, 0, 0]
            )
            extra[POSTERIOR_MEAN] = posterior_mean_slates(
                world, learned, covariance, requests, date
            )
        slates = slate_shares(
            world, believed, requests, date, bootstrap=200, extra=extra, reference=CEILING
        )
        slates += served_replay(args.root, day.version)
        print_table(f"top-10 slates on {args.date}, valued by the truth", slates)
    path = write_json(
        f"auc_ceiling-{args.root.name}-{date:%Y%m%d}",
        {
            "root": str(args.root),
            "date": args.date,
            "rows": len(evaluation.label),
            "clicks": int(evaluation.label.sum()),
            "training_rows": len(training.label),
            "rounds": args.rounds,
            "scorers": rows,
            "slate_requests": args.slates,
            "slates": slates,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
