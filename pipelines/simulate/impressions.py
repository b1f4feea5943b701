"""One day of ad-server traffic over the world: who saw which ad where, and who clicked (pure).

The logging policy mimics a real ad server so that the logs carry a learnable signal and the
biases later stages must cope with: a ``targeted_share`` of impressions shows the best of a few
random live ads by true score (a targeting system), the rest follows popularity × bid (run-of-
network delivery). Users and placements arrive with power-law weights, over a diurnal curve.

Randomness is keyed by (seed, day, hour), so the output does not depend on how the caller batches
or writes it, and the first days of a longer run equal a shorter run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from deepclick.settings import SimulateSettings
from pipelines.simulate.world import (
    World,
    ad_score,
    build_world,
    live_ads,
    live_placements,
    rng_for,
    sigmoid,
    true_logit,
)

# Stream keys after the world's (0..4), so traffic never reuses a world stream.
_STREAM_DAY, _STREAM_HOUR, _STREAM_CALIBRATION = 10, 11, 12
CALIBRATION_SAMPLE = 100_000
_SCORE_BLOCK = 1 << 16  # targeted rows scored at once: bounds the [rows, candidates, dim] gather


@dataclass(frozen=True)
class LoggingPolicy:
    """How the logging ad server picks the ad for an impression."""

    targeted_share: float
    candidates: int

    @classmethod
    def from_settings(cls, settings: SimulateSettings) -> LoggingPolicy:
        return cls(settings.targeted_share, settings.targeting_candidates)


@dataclass(frozen=True)
class DayPlan:
    """What is live on one day and how traffic is spread over it."""

    day: int
    day_start: int  # unix seconds of 00:00 UTC
    live_ads: np.ndarray
    ad_cdf: np.ndarray  # cumulative popularity × bid over live_ads
    live_placements: np.ndarray
    placement_cdf: np.ndarray
    user_cdf: np.ndarray
    hour_counts: np.ndarray  # impressions per UTC hour, summing to the day's volume


@dataclass(frozen=True)
class Impressions:
    """A batch of logged impressions, in time order, with their true click probability."""

    impression_no: np.ndarray  # int64, unique across the whole run
    time_stamp: np.ndarray  # unix seconds
    hour: np.ndarray
    user: np.ndarray
    placement: np.ndarray
    ad: np.ndarray
    targeted: np.ndarray  # chosen by the targeting system (else by popularity × bid)
    p_click: np.ndarray
    clk: np.ndarray  # int8 0/1

    def __len__(self) -> int:
        return len(self.impression_no)


def plan_day(world: World, day: int, impressions: int) -> DayPlan:
    """The live catalogue and hourly volumes of ``day`` (an error if nothing can serve)."""
    ads = live_ads(world, day)
    placements = live_placements(world, day)
    if len(ads) == 0:
        raise ValueError(
            f"no ad is live on day {day}: raise new_ads_per_day or lower ads_retired_per_day"
        )
    start = dt.datetime.combine(world.dates[day], dt.time(), tzinfo=dt.UTC)
    return DayPlan(
        day=day,
        day_start=int(start.timestamp()),
        live_ads=ads,
        ad_cdf=np.cumsum(world.ad_popularity[ads] * world.ad_bid[ads]),
        live_placements=placements,
        placement_cdf=np.cumsum(world.placement_traffic[placements]),
        user_cdf=np.cumsum(world.user_activity),
        hour_counts=rng_for(world.seed, _STREAM_DAY, day).multinomial(
            impressions, world.hour_traffic
        ),
    )


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Positions drawn with probability proportional to the weights behind ``cdf``."""
    keys = rng.random(n) * cdf[-1]
    order = np.argsort(keys)  # searching sorted keys is cache-friendly: ~3x faster on 1M weights
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.searchsorted(cdf, keys[order], side="right")
    return np.minimum(pos, len(cdf) - 1)


def choose_ads(
    world: World,
    plan: DayPlan,
    user: np.ndarray,
    placement: np.ndarray,
    policy: LoggingPolicy,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The logging policy: ``(ad, targeted)`` for each impression's user and placement."""
    n = len(user)
    targeted = rng.random(n) < policy.targeted_share
    ad = plan.live_ads[_draw(plan.ad_cdf, rng, n)]
    rows = np.flatnonzero(targeted)
    cand = plan.live_ads[rng.integers(0, len(plan.live_ads), (len(rows), policy.candidates))]
    for start in range(0, len(rows), _SCORE_BLOCK):
        block = slice(start, start + _SCORE_BLOCK)
        r, c = rows[block], cand[block]
        scores = ad_score(world, user[r], placement[r], c, all_pairs=False)
        ad[r] = c[np.arange(len(r)), np.argmax(scores, axis=1)]
    return ad, targeted


def sample_hour(
    world: World,
    plan: DayPlan,
    hour: int,
    n: int,
    policy: LoggingPolicy,
    rng: np.random.Generator,
    first_no: int,
) -> Impressions:
    """``n`` impressions in one UTC hour of the plan's day, numbered from ``first_no``."""
    seconds = np.sort(rng.integers(0, 3600, n))
    user = _draw(plan.user_cdf, rng, n)
    placement = plan.live_placements[_draw(plan.placement_cdf, rng, n)]
    ad, targeted = choose_ads(world, plan, user, placement, policy, rng)
    hours = np.full(n, hour, dtype=np.int8)
    p_click = sigmoid(true_logit(world, user, placement, ad, hours))
    return Impressions(
        impression_no=np.arange(first_no, first_no + n, dtype=np.int64),
        time_stamp=plan.day_start + hour * 3600 + seconds,
        hour=hours,
        user=user,
        placement=placement,
        ad=ad,
        targeted=targeted,
        p_click=p_click,
        clk=(rng.random(n) < p_click).astype(np.int8),
    )


def simulate_day(
    world: World, plan: DayPlan, policy: LoggingPolicy, first_no: int
) -> Iterator[Impressions]:
    """The day's impressions, one batch per UTC hour with traffic, in time order."""
    number = first_no
    for hour, n in enumerate(plan.hour_counts.tolist()):
        if n == 0:
            continue
        rng = rng_for(world.seed, _STREAM_HOUR, plan.day, hour)
        yield sample_hour(world, plan, hour, n, policy, rng, number)
        number += n


def calibrate_intercept(
    world: World, target_ctr: float, policy: LoggingPolicy, sample: int = CALIBRATION_SAMPLE
) -> World:
    """The world with the intercept that makes the logged CTR of day 0 ≈ ``target_ctr``.

    The intercept shifts every candidate equally, so it does not change which ads the policy
    picks: one sample of logged traffic without it, then a bisection on the mean probability.
    """
    base = replace(world, intercept=0.0)
    plan = plan_day(base, 0, sample)
    rng = rng_for(world.seed, _STREAM_CALIBRATION)
    batches = [
        sample_hour(base, plan, hour, n, policy, rng, 0)
        for hour, n in enumerate(plan.hour_counts.tolist())
        if n
    ]
    logit = np.concatenate([true_logit(base, b.user, b.placement, b.ad, b.hour) for b in batches])
    low, high = -30.0, 30.0
    for _ in range(60):  # the bracket shrinks below float precision
        mid = (low + high) / 2
        if sigmoid(logit + mid).mean() < target_ctr:
            low = mid
        else:
            high = mid
    return replace(world, intercept=(low + high) / 2)


def make_world(settings: SimulateSettings) -> World:
    """The marketplace of ``settings`` with its intercept calibrated to ``target_ctr``."""
    return calibrate_intercept(
        build_world(settings), settings.target_ctr, LoggingPolicy.from_settings(settings)
    )
