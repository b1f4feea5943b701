"""The generated ad marketplace and its true click model (pure numpy, no I/O).

Every later stage (two-tower retrieval, ANNOY candidates, the CTR ranker, offline evaluation) is
scored against this world: because the click probability of any (user, placement, ad, hour) is
known exactly, evaluation can measure recall against the truly best ads and the oracle AUC instead
of guessing from noisy clicks.

The model, on the logit scale::

    logit = intercept + user_bias[u] + placement_bias[p] + hour_effect[h]
            + ad_quality[a] + price_affinity·(pvalue_level[u] - 2)·log_price_z[a]
            + scale·(user_factor[u] + placement_factor[p])·ad_factor[a]

Latent factors are mostly explained by observable features (a user's profile, a placement's page
type and slot, an ad's category and brand) plus individual noise, so a model that reads features
can place a brand-new ad or placement correctly: cold start is learnable, while the individual
noise rewards id embeddings for entities with history. ``ad_quality`` has a heavy right tail: a
few ads are clicked by everyone regardless of taste, the failure mode of pure similarity retrieval
that later stages must measure.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from deepclick.settings import SimulateSettings

# Readable id prefixes; ids are "<prefix><index>" strings at the edges.
USER_PREFIX = "u"
PLACEMENT_PREFIX = "p"
AD_PREFIX = "a"
CAMPAIGN_PREFIX = "cmp"
CUSTOMER_PREFIX = "adv"
BRAND_PREFIX = "br"
CATEGORY_PREFIX = "cat"
IMPRESSION_PREFIX = "i"

PAGE_TYPES = ("home", "search", "article", "video", "app")
SLOT_SIZES = ("320x50", "300x250", "728x90", "native")
POSITIONS = (1, 2, 3, 4, 5)

# Shares of each kind among placements, and their planted effects on the click logit.
PAGE_TYPE_SHARE = (0.25, 0.2, 0.2, 0.15, 0.2)
PAGE_TYPE_EFFECT = (0.0, 0.25, -0.2, -0.1, 0.1)
SLOT_SIZE_SHARE = (0.3, 0.35, 0.15, 0.2)
SLOT_SIZE_EFFECT = (-0.35, 0.0, -0.15, 0.3)
POSITION_SHARE = (0.3, 0.25, 0.2, 0.15, 0.1)
POSITION_EFFECT = (0.0, -0.25, -0.45, -0.6, -0.75)  # strictly falling: position 1 clicks most

# User profile (taobao columns) marginals; shopping depth raises the propensity to click.
GENDER_SHARE = (0.35, 0.65)  # final_gender_code 1, 2
AGE_SHARE = (0.02, 0.1, 0.25, 0.3, 0.2, 0.1, 0.03)  # age_level 0..6
PVALUE_SHARE = (0.3, 0.55, 0.15)  # pvalue_level 1..3
SHOPPING_SHARE = (0.06, 0.14, 0.8)  # shopping_level 1..3
SHOPPING_EFFECT = (-0.3, 0.0, 0.25)
OCCUPATION_SHARE = 0.07  # occupation 1
NEW_USER_CLASS_SHARE = (0.1, 0.35, 0.3, 0.25)  # new_user_class_level 1..4
NUM_SEGMENTS = 24  # cms_segid 0..23

# Diurnal traffic (UTC hour of time_stamp) and a smaller evening lift in click propensity.
HOUR_TRAFFIC = (
    0.45, 0.3, 0.2, 0.15, 0.12, 0.15, 0.25, 0.45, 0.7, 0.85, 0.95, 1.0,
    1.05, 0.95, 0.9, 0.9, 0.95, 1.0, 1.1, 1.25, 1.4, 1.45, 1.2, 0.8,
)  # fmt: skip
HOUR_CTR_AMPLITUDE = 0.12
HOUR_CTR_PEAK = 21

# Price taste: high-pvalue users prefer dearer items, low-pvalue users cheaper ones.
PRICE_AFFINITY = 0.2
LOG_PRICE_MEAN = float(np.log(60.0))  # category price levels ~ N(LOG_PRICE_MEAN, 0.9)
LOG_PRICE_STD = float(np.hypot(0.9, 0.35))  # + per-ad spread 0.35
PLACEMENT_FACTOR_WEIGHT = 0.7  # context matters, less than the user

NEVER = int(np.iinfo(np.int32).max)  # end day of ads that never retire

# Independent random streams, so adding days or ads never reshuffles what already exists.
_STREAM_USERS, _STREAM_TASTE, _STREAM_CATALOGUE, _STREAM_PLACEMENTS, _STREAM_ADS = range(5)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """The random stream named by ``keys``: identical for the same keys whatever else changes."""
    return np.random.default_rng([seed, *keys])


def make_ids(prefix: str, n: int) -> np.ndarray:
    """``prefix0 .. prefix{n-1}`` as a fixed-width numpy unicode array (index i has id i)."""
    width = len(prefix) + len(str(max(n - 1, 0)))
    strings = np.strings.add(prefix, np.arange(n).astype(np.dtypes.StringDType()))
    return strings.astype(f"U{width}")


@dataclass(frozen=True, eq=False)
class World:
    """Everything the marketplace is made of, indexed by position (id ``i`` is row ``i``).

    Scalars describe the run; ``user_*``, ``placement_*`` and ``ad_*`` arrays are columns of the
    three entity tables. ``*_birth``/``ad_end`` are day indices (0 = ``start_date``): an entity is
    live on day ``d`` when ``birth <= d < end``. Categorical codes index ``PAGE_TYPES`` and
    ``SLOT_SIZES``; ``ad_cate``, ``ad_campaign``, ``ad_customer`` and ``ad_brand`` are integer
    codes written with their prefixes.
    """

    seed: int
    start_date: str
    days: int
    latent_dim: int
    intercept: float
    scale: float
    price_affinity: float
    hour_traffic: np.ndarray
    hour_effect: np.ndarray
    user_ids: np.ndarray
    user_segid: np.ndarray
    user_group: np.ndarray
    user_gender: np.ndarray
    user_age: np.ndarray
    user_pvalue: np.ndarray
    user_shopping: np.ndarray
    user_occupation: np.ndarray
    user_new_class: np.ndarray
    user_factor: np.ndarray
    user_bias: np.ndarray
    user_activity: np.ndarray
    placement_ids: np.ndarray
    placement_page: np.ndarray
    placement_slot: np.ndarray
    placement_position: np.ndarray
    placement_factor: np.ndarray
    placement_bias: np.ndarray
    placement_traffic: np.ndarray
    placement_birth: np.ndarray
    ad_ids: np.ndarray
    ad_cate: np.ndarray
    ad_campaign: np.ndarray
    ad_customer: np.ndarray
    ad_brand: np.ndarray
    ad_price: np.ndarray
    ad_bid: np.ndarray
    ad_factor: np.ndarray
    ad_quality: np.ndarray
    ad_log_price_z: np.ndarray
    ad_popularity: np.ndarray
    ad_birth: np.ndarray
    ad_end: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_placements(self) -> int:
        return len(self.placement_ids)

    @property
    def num_ads(self) -> int:
        return len(self.ad_ids)

    @property
    def dates(self) -> list[dt.date]:
        start = dt.date.fromisoformat(self.start_date)
        return [start + dt.timedelta(days=d) for d in range(self.days)]

    def day_index(self, day: int | str | dt.date) -> int:
        """Day ``0..days-1`` from an index, an ISO date or a date; other dates are an error."""
        if isinstance(day, str):
            day = dt.date.fromisoformat(day)
        if isinstance(day, dt.date):
            day = (day - dt.date.fromisoformat(self.start_date)).days
        index = int(day)
        if not 0 <= index < self.days:
            raise ValueError(
                f"day {day} is outside the simulated {self.days} days from {self.start_date}"
            )
        return index

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (scalars 0-d), the form saved in ``world.npz``."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @property
    def user_profile(self) -> list[np.ndarray]:
        """The observable fields a user's taste is drawn from (``_users``): what a model can know
        of a user without their history."""
        return [
            self.user_gender,
            self.user_age,
            self.user_pvalue,
            self.user_shopping,
            self.user_occupation,
            self.user_segid,
        ]

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> World:
        """The inverse of :meth:`to_arrays`; a missing array names the field."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in arrays:
                raise ValueError(f"world file has no array {f.name!r}: written by another version?")
            value = np.asarray(arrays[f.name])
            values[f.name] = value.item() if value.ndim == 0 else value
        values["start_date"] = str(values["start_date"])
        return cls(**values)


def live_ads(world: World, day: int | str | dt.date) -> np.ndarray:
    """Indices of the ads serving on ``day`` (the rows of that day's ad_feature.csv)."""
    d = world.day_index(day)
    return np.flatnonzero((world.ad_birth <= d) & (d < world.ad_end))


def live_placements(world: World, day: int | str | dt.date) -> np.ndarray:
    """Indices of the placements live on ``day`` (placements never retire)."""
    d = world.day_index(day)
    return np.flatnonzero(world.placement_birth <= d)


def ad_score(
    world: World,
    user_idx: np.ndarray,
    placement_idx: np.ndarray,
    ad_idx: np.ndarray,
    *,
    all_pairs: bool,
) -> np.ndarray:
    """The ad-dependent part of the true logit: quality, price taste and latent match.

    It is what a perfect targeting system ranks candidates by, since the rest of the logit is the
    same for every ad shown in one impression.

    ``all_pairs=False``: ``ad_idx`` has the shape of ``user_idx`` plus optional trailing axes
    (candidates per row). ``all_pairs=True``: every ad of the 1-D ``ad_idx`` for every query
    (an ``[n_queries, n_ads]`` matrix, a matrix product instead of a gather).
    """
    context = world.user_factor[user_idx].astype(np.float64) + world.placement_factor[placement_idx]
    taste = world.user_pvalue[user_idx].astype(np.float64) - 2.0
    if all_pairs:
        match = context @ world.ad_factor[ad_idx].T.astype(np.float64)
        taste = taste[:, None]
    else:
        extra = ad_idx.ndim - user_idx.ndim
        context = context.reshape(context.shape[:-1] + (1,) * extra + context.shape[-1:])
        taste = taste.reshape(taste.shape + (1,) * extra)
        match = np.einsum("...d,...d->...", context, world.ad_factor[ad_idx])
    return (
        world.ad_quality[ad_idx]
        + world.price_affinity * taste * world.ad_log_price_z[ad_idx]
        + world.scale * match
    )


def _base_terms(
    world: World, user_idx: np.ndarray, placement_idx: np.ndarray, hour: np.ndarray
) -> np.ndarray:
    """The part of the logit that does not depend on the ad (same for every candidate)."""
    return (
        world.intercept
        + world.user_bias[user_idx]
        + world.placement_bias[placement_idx]
        + world.hour_effect[hour]
    )


def true_logit(
    world: World,
    user_idx: np.ndarray | int,
    placement_idx: np.ndarray | int,
    ad_idx: np.ndarray | int,
    hour: np.ndarray | int,
) -> np.ndarray:
    """The true click logit of each (user, placement, ad, UTC hour) row (arguments broadcast)."""
    u, p, a, h = np.broadcast_arrays(
        np.asarray(user_idx), np.asarray(placement_idx), np.asarray(ad_idx), np.asarray(hour)
    )
    return _base_terms(world, u, p, h) + ad_score(world, u, p, a, all_pairs=False)


def sigmoid(logit: np.ndarray) -> np.ndarray:
    """The logistic function (``exp`` may overflow to inf for very negative logits: p = 0)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-logit))


def true_click_probability(
    world: World,
    user_idx: np.ndarray | int,
    placement_idx: np.ndarray | int,
    ad_idx: np.ndarray | int,
    hour: np.ndarray | int,
) -> np.ndarray:
    """The exact click probability the simulator used (arguments broadcast; indices, not ids)."""
    return sigmoid(true_logit(world, user_idx, placement_idx, ad_idx, hour))


def best_ads(
    world: World,
    user_idx: np.ndarray | int,
    placement_idx: np.ndarray | int,
    hour: np.ndarray | int,
    k: int,
    *,
    day: int | str | dt.date,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` ads with the highest true click probability among those live on ``day``.

    The ground truth for "recall of the best ads": returns ``(ad_idx, p_click)``, both
    ``[n_queries, k]`` (best first, ties broken by ad index), for 1-D or scalar queries.
    """
    u, p, h = (np.atleast_1d(np.asarray(x)) for x in (user_idx, placement_idx, hour))
    u, p, h = np.broadcast_arrays(u, p, h)
    ads = live_ads(world, day)
    k = min(k, len(ads))
    if k < 1:
        raise ValueError(f"k must be at least 1 and day {day} must have live ads")
    top_idx = np.empty((len(u), k), dtype=np.int64)
    top_p = np.empty((len(u), k), dtype=np.float64)
    rows = max(1, (1 << 23) // len(ads))  # ~64 MB of scores per block
    for start in range(0, len(u), rows):
        block = slice(start, start + rows)
        scores = ad_score(world, u[block], p[block], ads, all_pairs=True)
        if k < len(ads):
            cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            cand = np.broadcast_to(np.arange(len(ads)), scores.shape)
        cand_scores = np.take_along_axis(scores, cand, axis=1)
        order = np.lexsort((ads[cand], -cand_scores), axis=1)
        best = np.take_along_axis(cand, order, axis=1)
        top_idx[block] = ads[best]
        logits = _base_terms(world, u[block], p[block], h[block])[:, None]
        top_p[block] = sigmoid(logits + np.take_along_axis(scores, best, axis=1))
    return top_idx, top_p


def index_of(world: World, kind: str, ids: np.ndarray | list[str]) -> np.ndarray:
    """Entity indices of string ids (``kind`` ∈ user, placement, ad); unknown ids are an error."""
    prefixes = {"user": USER_PREFIX, "placement": PLACEMENT_PREFIX, "ad": AD_PREFIX}
    if kind not in prefixes:
        raise ValueError(f"kind must be one of {sorted(prefixes)}, not {kind!r}")
    known = getattr(world, f"{kind}_ids")
    values = np.asarray(ids, dtype=str)
    digits = np.strings.slice(values, len(prefixes[kind]), None)
    ok = np.strings.startswith(values, prefixes[kind]) & np.strings.isdecimal(digits)
    ok &= np.strings.str_len(digits) <= 18  # fits int64
    index = np.where(ok, digits, "0").astype(np.int64)
    ok &= index < len(known)
    ok &= known[np.where(ok, index, 0)] == values
    if not ok.all():
        bad = values[~ok][:5].tolist()
        raise KeyError(f"unknown {kind} ids (first {len(bad)}): {bad}")
    return index


# --- building -------------------------------------------------------------------------------


def _mix(*parts: tuple[float, np.ndarray]) -> np.ndarray:
    """Weighted sum of unit-variance parts, rescaled to unit variance per element (float32)."""
    total = sum(w * x for w, x in parts)
    return (total / np.sqrt(sum(w * w for w, _ in parts))).astype(np.float32)


def _choice(rng: np.random.Generator, shares: tuple[float, ...], n: int) -> np.ndarray:
    shares_arr = np.asarray(shares, dtype=np.float64)
    return rng.choice(len(shares_arr), size=n, p=shares_arr / shares_arr.sum())


@dataclass(frozen=True)
class _Taste:
    """Embedding tables of observable features: what makes cold start learnable."""

    gender: np.ndarray
    age: np.ndarray
    pvalue: np.ndarray
    shopping: np.ndarray
    occupation: np.ndarray
    segment: np.ndarray
    page: np.ndarray
    slot: np.ndarray


@dataclass(frozen=True)
class _Catalogue:
    """Categories, brands, advertisers and campaigns that ads are created under."""

    cate_factor: np.ndarray
    cate_quality: np.ndarray
    cate_log_price: np.ndarray
    brand_factor: np.ndarray
    campaign_customer: np.ndarray
    campaign_cate: np.ndarray
    campaign_brand: np.ndarray
    campaign_bid: np.ndarray
    campaign_weight: np.ndarray


def _taste(seed: int, d: int) -> _Taste:
    rng = rng_for(seed, _STREAM_TASTE)
    return _Taste(
        gender=rng.standard_normal((len(GENDER_SHARE), d)),
        age=rng.standard_normal((len(AGE_SHARE), d)),
        pvalue=rng.standard_normal((len(PVALUE_SHARE), d)),
        shopping=rng.standard_normal((len(SHOPPING_SHARE), d)),
        occupation=rng.standard_normal((2, d)),
        segment=rng.standard_normal((NUM_SEGMENTS, d)),
        page=rng.standard_normal((len(PAGE_TYPES), d)),
        slot=rng.standard_normal((len(SLOT_SIZES), d)),
    )


def _users(settings: SimulateSettings, taste: _Taste) -> dict[str, np.ndarray]:
    n, d = settings.num_users, settings.latent_dim
    rng = rng_for(settings.seed, _STREAM_USERS)
    gender = _choice(rng, GENDER_SHARE, n)
    age = _choice(rng, AGE_SHARE, n)
    pvalue = _choice(rng, PVALUE_SHARE, n)
    shopping = _choice(rng, SHOPPING_SHARE, n)
    occupation = (rng.random(n) < OCCUPATION_SHARE).astype(np.int8)
    new_class = _choice(rng, NEW_USER_CLASS_SHARE, n)
    segid = _choice(rng, tuple(1.0 / (1.0 + np.arange(NUM_SEGMENTS))), n)
    factor = _mix(
        (1.0, taste.gender[gender]),
        (1.0, taste.age[age]),
        (0.6, taste.pvalue[pvalue]),
        (0.5, taste.shopping[shopping]),
        (0.5, taste.occupation[occupation]),
        (0.7, taste.segment[segid]),
        (0.8, rng.standard_normal((n, d))),
    )
    bias = np.asarray(SHOPPING_EFFECT)[shopping] + 0.35 * rng.standard_normal(n)
    return {
        "user_ids": make_ids(USER_PREFIX, n),
        "user_segid": segid.astype(np.int16),
        "user_group": ((gender * len(AGE_SHARE)) + age).astype(np.int16),
        "user_gender": (gender + 1).astype(np.int8),
        "user_age": age.astype(np.int8),
        "user_pvalue": (pvalue + 1).astype(np.int8),
        "user_shopping": (shopping + 1).astype(np.int8),
        "user_occupation": occupation,
        "user_new_class": (new_class + 1).astype(np.int8),
        "user_factor": factor,
        "user_bias": bias,
        "user_activity": rng.pareto(1.8, n) + 1.0,  # power-law: a few users browse a lot
    }


def _placements(
    rng: np.random.Generator, n: int, d: int, birth: int, taste: _Taste
) -> dict[str, np.ndarray]:
    page = _choice(rng, PAGE_TYPE_SHARE, n)
    slot = _choice(rng, SLOT_SIZE_SHARE, n)
    position = _choice(rng, POSITION_SHARE, n)
    factor = PLACEMENT_FACTOR_WEIGHT * _mix(
        (1.0, taste.page[page]), (0.5, taste.slot[slot]), (0.6, rng.standard_normal((n, d)))
    )
    bias = (
        np.asarray(PAGE_TYPE_EFFECT)[page]
        + np.asarray(SLOT_SIZE_EFFECT)[slot]
        + np.asarray(POSITION_EFFECT)[position]
        + 0.1 * rng.standard_normal(n)
    )
    return {
        "placement_page": page.astype(np.int8),
        "placement_slot": slot.astype(np.int8),
        "placement_position": (position + 1).astype(np.int8),
        "placement_factor": factor.astype(np.float32),
        "placement_bias": bias,
        "placement_traffic": rng.pareto(1.2, n) + 1.0,
        "placement_birth": np.full(n, birth, dtype=np.int32),
    }


def _catalogue(settings: SimulateSettings) -> _Catalogue:
    """Advertisers own brands and run campaigns (a category, a bid); ads belong to campaigns."""
    rng = rng_for(settings.seed, _STREAM_CATALOGUE)
    d = settings.latent_dim
    n_cate = max(8, settings.num_ads // 50)
    n_adv = settings.num_advertisers
    n_brand = 2 * n_adv
    n_camp = max(n_adv, settings.num_ads // 8)
    cate_weight = rng.pareto(1.0, n_cate) + 1.0
    adv_cate = rng.choice(n_cate, size=n_adv, p=cate_weight / cate_weight.sum())
    adv_weight = rng.pareto(1.2, n_adv) + 1.0
    # Each advertiser owns its own brand plus, for some, extra brands.
    brand_owner = np.concatenate([np.arange(n_adv), rng.integers(0, n_adv, n_brand - n_adv)])
    camp_adv = rng.choice(n_adv, size=n_camp, p=adv_weight / adv_weight.sum())
    other_cate = rng.choice(n_cate, size=n_camp, p=cate_weight / cate_weight.sum())
    camp_cate = np.where(rng.random(n_camp) < 0.8, adv_cate[camp_adv], other_cate)
    by_owner = np.argsort(brand_owner, kind="stable")
    first = np.searchsorted(brand_owner[by_owner], camp_adv)
    owned = np.bincount(brand_owner, minlength=n_adv)[camp_adv]
    camp_brand = by_owner[first + (rng.random(n_camp) * owned).astype(np.int64)]
    return _Catalogue(
        cate_factor=rng.standard_normal((n_cate, d)),
        cate_quality=0.2 * rng.standard_normal(n_cate),
        cate_log_price=LOG_PRICE_MEAN + 0.9 * rng.standard_normal(n_cate),
        brand_factor=rng.standard_normal((n_brand, d)),
        campaign_customer=camp_adv,
        campaign_cate=camp_cate,
        campaign_brand=camp_brand,
        campaign_bid=np.exp(np.log(0.6) + 0.5 * rng.standard_normal(n_camp)),
        campaign_weight=rng.pareto(1.5, n_camp) + 1.0,
    )


def _ads(
    rng: np.random.Generator, n: int, d: int, birth: int, retire: float, cat: _Catalogue
) -> dict[str, np.ndarray]:
    weight = cat.campaign_weight / cat.campaign_weight.sum()
    campaign = rng.choice(len(weight), size=n, p=weight)
    cate = cat.campaign_cate[campaign]
    brand = cat.campaign_brand[campaign]
    log_price = cat.cate_log_price[cate] + 0.35 * rng.standard_normal(n)
    price = np.maximum(np.round(np.exp(log_price), 2), 0.01)
    bid = np.maximum(
        np.round(cat.campaign_bid[campaign] * np.exp(0.15 * rng.standard_normal(n)), 2), 0.05
    )
    factor = _mix(
        (1.0, cat.cate_factor[cate]),
        (0.6, cat.brand_factor[brand]),
        (0.5, rng.standard_normal((n, d))),
    )
    # Heavy right tail (Lomax α=3, capped): ~1% of ads gain ~2 logits whatever the match.
    heavy = 0.5 * np.minimum(rng.pareto(3.0, n), 5.0)
    quality = cat.cate_quality[cate] + 0.25 * rng.standard_normal(n) + heavy
    lifetime = rng.geometric(retire, n) if retire > 0 else np.full(n, NEVER - birth)
    return {
        "ad_cate": cate.astype(np.int32),
        "ad_campaign": campaign.astype(np.int32),
        "ad_customer": cat.campaign_customer[campaign].astype(np.int32),
        "ad_brand": brand.astype(np.int32),
        "ad_price": price,
        "ad_bid": bid,
        "ad_factor": factor,
        "ad_quality": quality,
        "ad_log_price_z": (np.log(price) - LOG_PRICE_MEAN) / LOG_PRICE_STD,
        "ad_popularity": rng.pareto(1.2, n) + 1.0,  # power-law exposure
        "ad_birth": np.full(n, birth, dtype=np.int32),
        "ad_end": np.minimum(birth + lifetime, NEVER).astype(np.int32),
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def build_world(settings: SimulateSettings, intercept: float = 0.0) -> World:
    """Draw the whole marketplace for ``settings.days`` days (``intercept`` not yet calibrated).

    Day ``d >= 1`` adds ``round(new_ads_per_day · num_ads)`` ads and
    ``round(new_placements_per_day · num_placements)`` placements, each from its own random
    stream: the first days of a longer run are the same world as a shorter run.
    """
    d = settings.latent_dim
    taste = _taste(settings.seed, d)
    catalogue = _catalogue(settings)
    new_placements = round(settings.new_placements_per_day * settings.num_placements)
    new_ads = round(settings.new_ads_per_day * settings.num_ads)
    placements = _concat(
        [
            _placements(
                rng_for(settings.seed, _STREAM_PLACEMENTS, day),
                settings.num_placements if day == 0 else new_placements,
                d,
                day,
                taste,
            )
            for day in range(settings.days)
        ]
    )
    ads = _concat(
        [
            _ads(
                rng_for(settings.seed, _STREAM_ADS, day),
                settings.num_ads if day == 0 else new_ads,
                d,
                day,
                settings.ads_retired_per_day,
                catalogue,
            )
            for day in range(settings.days)
        ]
    )
    hours = np.arange(24)
    traffic = np.asarray(HOUR_TRAFFIC)
    return World(
        seed=settings.seed,
        start_date=dt.date.fromisoformat(settings.start_date).isoformat(),
        days=settings.days,
        latent_dim=d,
        intercept=float(intercept),
        # (user + placement)·ad has variance (1 + w²)·d over random triples: normalise it away.
        scale=settings.signal_strength / float(np.sqrt((1 + PLACEMENT_FACTOR_WEIGHT**2) * d)),
        price_affinity=PRICE_AFFINITY,
        hour_traffic=traffic / traffic.sum(),
        hour_effect=HOUR_CTR_AMPLITUDE * np.cos(2 * np.pi * (hours - HOUR_CTR_PEAK) / 24),
        **_users(settings, taste),
        placement_ids=make_ids(PLACEMENT_PREFIX, len(placements["placement_birth"])),
        **placements,
        ad_ids=make_ids(AD_PREFIX, len(ads["ad_birth"])),
        **ads,
    )
