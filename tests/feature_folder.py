"""A small, synthetic but contract-true features folder (docs/contracts.md §3) for model tests.

The models (two-tower, CTR ranker) read nothing but a published features folder, so their tests
need one without running Spark. :func:`write_feature_folder` writes it with pandas, following the
same rules as ``pipelines/features`` (vocabularies from training rows with ``min_count``, numeric
statistics after ``log1p``, point-in-time history features from strictly earlier days, defaults
for missing values, ``ad_log_q`` on the retrieval set) and returns the PLANTED truth with it, so a
test asserts against a known answer instead of restating the code:

- every user belongs to a group ``g`` (feature ``user__segment`` = ``seg<g>``) and every ad to a
  category (``ad__cate_id`` = ``cat<c>``); a user clicks an ad of their own group's category with
  probability ~``sigmoid(base + match_strength)``, any other ad with ~``sigmoid(base)``.
  Retrieval models should put same-category ads first; a ranker should beat a model without the
  user × ad interaction.
- ads are shown with Zipf-like popularity (independent of category), so a popularity baseline is
  meaningful and the two-tower ``ad_log_q`` correction matters.
- ``ctx__position`` shifts the CTR (``1`` best, ``3`` worst) and ``ctx__hour`` adds a daily wave,
  so context features carry a (weaker) signal too; ``ctx__hour`` / ``ctx__dow`` are request-time
  features, absent from ``entities/placements``.
- ``new_ads`` ads exist only in the catalogue (``entities/ads``) and on the target day: their id
  is out of vocabulary but their category and brand are known (cold start).

Typical use::

    folder = write_feature_folder(tmp_path / "features")
    spec = folder.spec                         # a loaded FeatureSpec (spec.folder is set)
    clicks = folder.table("training/retrieval")
    folder.truth.user_group["u0007"]           # planted facts

Sizes are parameters; the defaults write ~30k ranking rows in well under a second.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from models.feature_spec import (
    FEATURE_TABLES,
    MISSING,
    EntitySpec,
    Feature,
    FeatureSpec,
    load_feature_spec,
)

TABLES = FEATURE_TABLES
ALL_PLACEMENTS = "__all__"
POSITION_EFFECT = {"1": 0.5, "2": 0.0, "3": -0.5}
HISTORY = ("hist_impressions", "hist_clicks", "hist_ctr")
PREFIX = {"user": "user__", "context": "ctx__", "ad": "ad__"}
KEY = {"user": "user_id", "context": "placement_id", "ad": "ad_id"}
TABLE = {"user": "users", "context": "placements", "ad": "ads"}
ENTITY = {"user": "user", "context": "placement", "ad": "ad"}


@dataclass(frozen=True)
class PlantedTruth:
    """What generated the data; never written into the folder (like the simulator's ``_truth``)."""

    user_group: dict[str, int]
    ad_category: dict[str, int]
    new_ads: tuple[str, ...]
    groups: int
    eval_p_click: np.ndarray = field(repr=False)
    """The true click probability of each ``eval`` row, in the table's row order."""


@dataclass(frozen=True)
class FeatureFolder:
    """A written features folder: its path, its loaded spec and the planted truth."""

    path: Path
    spec: FeatureSpec
    truth: PlantedTruth

    def table(self, name: str) -> pd.DataFrame:
        """One table of the folder (``training/retrieval``, ``entities/ads``, ...) as pandas."""
        return pd.read_parquet(self.path / name)


def _features(roles: dict[str, list[tuple[str, str, str, bool]]]) -> list[Feature]:
    """Features in spec order (per role: id, event features, side features, history)."""
    features: list[Feature] = []
    for role, entries in roles.items():
        features.append(Feature(KEY[role], role, "categorical", "string", "events", is_id=True))
        for name, kind, source, flag in entries:
            features.append(
                Feature(
                    name,
                    role,
                    kind,
                    "string" if kind == "categorical" else "double",
                    source,
                    request_time=flag and kind == "categorical",
                    log1p=flag and kind == "numeric",
                )
            )
        for suffix in HISTORY:
            features.append(
                Feature(
                    f"{PREFIX[role]}{suffix}",
                    role,
                    "numeric",
                    "double",
                    "history",
                    log1p=suffix != "hist_ctr",
                )
            )
    return features


# (name, kind, source, flag): flag = request_time for categorical, log1p for numeric features.
FEATURES: dict[str, list[tuple[str, str, str, bool]]] = {
    "user": [
        ("user__segment", "categorical", "side", False),
        ("user__age_level", "categorical", "side", False),
    ],
    "context": [
        ("ctx__hour", "categorical", "events", True),
        ("ctx__dow", "categorical", "events", True),
        ("ctx__page_type", "categorical", "side", False),
        ("ctx__position", "categorical", "side", False),
    ],
    "ad": [
        ("ad__cate_id", "categorical", "side", False),
        ("ad__brand", "categorical", "side", False),
        ("ad__campaign_id", "categorical", "side", False),
        ("ad__customer", "categorical", "side", False),
        ("ad__price", "numeric", "side", True),
        ("ad__bid", "numeric", "side", True),
    ],
}


def _catalogues(
    rng: np.random.Generator, users: int, placements: int, ads: int, new_ads: int, groups: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The side tables: one row per user, placement and ad (new ads last)."""
    user_ids = [f"u{i:05d}" for i in range(users)]
    user_frame = pd.DataFrame(
        {
            "user_id": user_ids,
            "user__segment": [f"seg{i % groups}" for i in range(users)],
            "user__age_level": rng.integers(1, 6, users).astype(str),
        }
    )
    placement_frame = pd.DataFrame(
        {
            "placement_id": [f"p{i:03d}" for i in range(placements)],
            "ctx__page_type": rng.choice(["home", "search", "detail"], placements),
            "ctx__position": [str(1 + i % 3) for i in range(placements)],
        }
    )
    total = ads + new_ads
    category = rng.integers(0, groups, total)
    brand = rng.integers(0, 4, total)
    advertiser = rng.integers(0, max(2, total // 10), total)
    ad_frame = pd.DataFrame(
        {
            "ad_id": [f"a{i:05d}" for i in range(total)],
            "ad__cate_id": [f"cat{c}" for c in category],
            "ad__brand": [f"b{c}_{b}" for c, b in zip(category, brand, strict=True)],
            "ad__campaign_id": [f"cmp{a}_{c}" for a, c in zip(advertiser, category, strict=True)],
            "ad__customer": [f"adv{a}" for a in advertiser],
            "ad__price": np.round(np.exp(rng.normal(3.0 + 0.3 * category, 0.5)), 2),
            "ad__bid": np.round(rng.gamma(2.0, 0.5, total), 3),
        }
    )
    return user_frame, placement_frame, ad_frame


def _impressions(
    rng: np.random.Generator,
    days: list[dt.date],
    per_day: int,
    user_frame: pd.DataFrame,
    placement_frame: pd.DataFrame,
    ad_frame: pd.DataFrame,
    n_old_ads: int,
    groups: int,
    base_logit: float,
    match_strength: float,
    popularity_skew: float,
    id_bias_std: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Impressions of every day with their true click probability and a drawn label."""
    n_ads = len(ad_frame)
    popularity = 1.0 / np.arange(1, n_ads + 1) ** popularity_skew
    popularity = popularity[rng.permutation(n_ads)]
    frames = []
    for day in days:
        live = np.arange(n_ads) if day == days[-1] else np.arange(n_old_ads)
        weights = popularity[live] / popularity[live].sum()
        ad_rows = rng.choice(live, per_day, p=weights)
        user_rows = rng.integers(0, len(user_frame), per_day)
        placement_rows = rng.integers(0, len(placement_frame), per_day)
        hours = rng.integers(0, 24, per_day)
        frames.append(
            pd.DataFrame(
                {
                    "date": day,
                    "_user": user_rows,
                    "_placement": placement_rows,
                    "_ad": ad_rows,
                    "ctx__hour": hours.astype(str),
                    "ctx__dow": str(day.weekday()),
                }
            )
        )
    rows = pd.concat(frames, ignore_index=True)
    group = rows["_user"].to_numpy() % groups
    category = ad_frame["ad__cate_id"].str[3:].astype(int).to_numpy()[rows["_ad"].to_numpy()]
    position = placement_frame["ctx__position"].to_numpy()[rows["_placement"].to_numpy()]
    logit = (
        base_logit
        + match_strength * (group == category)
        + np.vectorize(POSITION_EFFECT.get)(position)
        + 0.3 * np.sin(2 * np.pi * rows["ctx__hour"].astype(int).to_numpy() / 24)
    )
    if id_bias_std:
        # own stream, so folders without id biases stay exactly as they were
        bias_rng = np.random.default_rng(seed + 1_000)
        user_bias = bias_rng.normal(0.0, id_bias_std, len(user_frame))
        ad_bias = bias_rng.normal(0.0, id_bias_std, n_ads)
        logit = logit + user_bias[rows["_user"].to_numpy()] + ad_bias[rows["_ad"].to_numpy()]
    rows["p_click"] = 1.0 / (1.0 + np.exp(-logit))
    rows["label"] = (rng.random(len(rows)) < rows["p_click"]).astype("int32")
    rows["user_id"] = user_frame["user_id"].to_numpy()[rows["_user"].to_numpy()]
    rows["placement_id"] = placement_frame["placement_id"].to_numpy()[rows["_placement"].to_numpy()]
    rows["ad_id"] = ad_frame["ad_id"].to_numpy()[rows["_ad"].to_numpy()]
    rows["event_id"] = [f"e{i:08d}" for i in range(len(rows))]
    return rows.drop(columns=["_user", "_placement", "_ad"])


def _prior_by_day(rows: pd.DataFrame, target: dt.date) -> tuple[float, dict[dt.date, float]]:
    """Global CTR before the target day, and each day's smoothing prior (CTR of earlier days)."""
    daily = rows.groupby("date")["label"].agg(["size", "sum"])
    before = daily[daily.index < target]
    global_ctr = float(before["sum"].sum() / before["size"].sum())
    priors = {}
    for day in daily.index:
        earlier = daily[daily.index < day]
        priors[day] = float(earlier["sum"].sum() / earlier["size"].sum()) if len(earlier) else None
    return global_ctr, {d: global_ctr if p is None else p for d, p in priors.items()}


def _add_history(
    rows: pd.DataFrame, role: str, priors: dict[dt.date, float], strength: float
) -> pd.DataFrame:
    """Point-in-time history of one entity on each row: counts of strictly earlier days only."""
    key, prefix = KEY[role], PREFIX[role]
    daily = rows.groupby([key, "date"])["label"].agg(["size", "sum"]).reset_index()
    daily = daily.sort_values([key, "date"])
    grouped = daily.groupby(key)
    daily[f"{prefix}hist_impressions"] = (grouped["size"].cumsum() - daily["size"]).astype(float)
    daily[f"{prefix}hist_clicks"] = (grouped["sum"].cumsum() - daily["sum"]).astype(float)
    out = rows.merge(daily.drop(columns=["size", "sum"]), on=[key, "date"], how="left")
    prior = out["date"].map(priors).astype(float)
    out[f"{prefix}hist_ctr"] = (out[f"{prefix}hist_clicks"] + strength * prior) / (
        out[f"{prefix}hist_impressions"] + strength
    )
    return out


def _entity_table(
    catalogue: pd.DataFrame,
    train: pd.DataFrame,
    role: str,
    global_ctr: float,
    strength: float,
) -> pd.DataFrame:
    """An entity table as of the target day: profile + history of all training days."""
    key, prefix = KEY[role], PREFIX[role]
    totals = train.groupby(key)["label"].agg(["size", "sum"])
    table = catalogue.copy()
    imps = table[key].map(totals["size"]).fillna(0).astype(float)
    clicks = table[key].map(totals["sum"]).fillna(0).astype(float)
    table[f"{prefix}hist_impressions"] = imps
    table[f"{prefix}hist_clicks"] = clicks
    table[f"{prefix}hist_ctr"] = (clicks + strength * global_ctr) / (imps + strength)
    return table


def _vocabulary(values: pd.Series, min_count: int) -> list[str]:
    """Values seen ``min_count`` times or more, most frequent first, ties by value."""
    counts = values.value_counts()
    counts = counts[counts >= min_count]
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [str(value) for value, _ in ordered]


def _write(frame: pd.DataFrame, folder: Path) -> int:
    """One Parquet part file in ``folder`` (the layout Spark writes); returns the row count."""
    folder.mkdir(parents=True, exist_ok=True)
    frame.reset_index(drop=True).to_parquet(folder / "part-00000.parquet", index=False)
    return len(frame)


def write_feature_folder(
    folder: Path,
    *,
    users: int = 500,
    placements: int = 12,
    ads: int = 300,
    new_ads: int = 12,
    groups: int = 8,
    impressions_per_day: int = 10_000,
    train_days: int = 3,
    base_logit: float = -3.5,
    match_strength: float = 3.0,
    popularity_skew: float = 0.5,
    min_count: int = 2,
    oov_buckets: int = 1,
    ctr_prior_strength: float = 20.0,
    popularity_top_n: int = 200,
    id_bias_std: float = 0.0,
    seed: int = 0,
) -> FeatureFolder:
    """Write a features folder with a planted signal and return it with its truth.

    Args:
        folder: where to write (created; it plays the published ``features/<version>`` folder).
        users, placements, ads: catalogue sizes; ``new_ads`` more ads appear on the target day only.
        groups: user groups = ad categories; the planted match is group ``g`` ↔ category ``g``.
        impressions_per_day: impressions of each training day and of the target day.
        train_days: days before the target day (2024-01-01 onwards).
        base_logit, match_strength: click logit without / added by a group–category match.
        id_bias_std: std of a per-user and a per-ad click-logit bias (0: none), what a one-hot
            logistic regression learns and embeddings under-use (issue 10).
        popularity_skew: Zipf exponent of how often each ad is shown (0 = uniform).
        min_count, oov_buckets, ctr_prior_strength, popularity_top_n: as in FeatureSettings.
        seed: everything is drawn from this seed; the same arguments give the same folder.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    first = dt.date(2024, 1, 1)
    days = [first + dt.timedelta(days=i) for i in range(train_days + 1)]
    target = days[-1]
    user_frame, placement_frame, ad_frame = _catalogues(
        rng, users, placements, ads, new_ads, groups
    )
    rows = _impressions(
        rng,
        days,
        impressions_per_day,
        user_frame,
        placement_frame,
        ad_frame,
        ads,
        groups,
        base_logit,
        match_strength,
        popularity_skew,
        id_bias_std,
        seed,
    )
    rows = rows.merge(user_frame, on="user_id").merge(placement_frame, on="placement_id")
    rows = rows.merge(ad_frame, on="ad_id").sort_values("event_id", ignore_index=True)
    global_ctr, priors = _prior_by_day(rows, target)
    for role in KEY:
        rows = _add_history(rows, role, priors, ctr_prior_strength)

    features = _features(FEATURES)
    names = [f.name for f in features]
    train = rows[rows["date"] < target]
    evaluation = rows[rows["date"] == target]

    described: list[Feature] = []
    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    for feature in features:
        if feature.kind == "categorical":
            vocabulary = _vocabulary(train[feature.name], min_count)
            path = vocab_dir / f"{feature.name}.txt"
            path.write_text("".join(v + "\n" for v in vocabulary), encoding="utf-8")
            described.append(
                replace(
                    feature,
                    vocabulary_file=f"vocab/{feature.name}.txt",
                    vocabulary_size=len(vocabulary),
                    oov_buckets=oov_buckets,
                    default=MISSING,
                )
            )
            continue
        values = train[feature.name].astype(float)
        if feature.log1p:
            values = np.log1p(values.clip(lower=0.0))
        mean, std = float(values.mean()), float(values.std(ddof=0))
        if feature.source == "history":
            default = global_ctr if feature.name.endswith("hist_ctr") else 0.0
        else:
            default = math.expm1(mean) if feature.log1p else mean
        described.append(
            replace(
                feature,
                mean=mean,
                std=std if std > 0 else 1.0,
                min=float(values.min()),
                max=float(values.max()),
                default=default,
            )
        )

    entities: dict[str, EntitySpec] = {}
    tables: dict[str, pd.DataFrame] = {}
    catalogues = {"user": user_frame, "context": placement_frame, "ad": ad_frame}
    for role, catalogue in catalogues.items():
        table = _entity_table(catalogue, train, role, global_ctr, ctr_prior_strength)
        held = [c for c in table.columns if c != KEY[role]]
        entities[ENTITY[role]] = EntitySpec(
            ENTITY[role], role, KEY[role], f"entities/{TABLE[role]}", tuple(held)
        )
        tables[f"entities/{TABLE[role]}"] = table

    clicked = train[train["label"] == 1]
    share = clicked["ad_id"].value_counts(normalize=True)
    tables["training/ranking"] = train[["event_id", "date", "label", *names]]
    tables["training/retrieval"] = clicked[["event_id", "date", *names]].assign(
        ad_log_q=np.log(clicked["ad_id"].map(share).to_numpy())
    )
    tables["eval"] = evaluation[["event_id", "date", "label", *names]]
    tables["popularity"] = _popularity(train, popularity_top_n)

    spec = FeatureSpec(
        version=target.strftime("%Y%m%d"),
        dataset="planted",
        target_date=target.isoformat(),
        train_dates=tuple(d.isoformat() for d in days[:-1]),
        global_ctr=global_ctr,
        ctr_prior_strength=ctr_prior_strength,
        features=tuple(described),
        entities=entities,
    )
    spec.write(folder)
    counts = {name: _write(tables[name], folder / name) for name in TABLES}
    manifest = {
        "version": spec.version,
        "created_at": "2024-01-04T00:00:00+00:00",
        "stage": "features",
        "dataset": "planted",
        "inputs": {},
        "counts": counts,
        "metrics": {"global_ctr": global_ctr},
        "checksums": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    truth = PlantedTruth(
        user_group={u: i % groups for i, u in enumerate(user_frame["user_id"])},
        ad_category={
            a: int(c[3:]) for a, c in zip(ad_frame["ad_id"], ad_frame["ad__cate_id"], strict=True)
        },
        new_ads=tuple(ad_frame["ad_id"].iloc[ads:]),
        groups=groups,
        eval_p_click=evaluation["p_click"].to_numpy(),
    )
    return FeatureFolder(folder, load_feature_spec(folder), truth)


def _popularity(train: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """Top ads by clicks, overall (``__all__``) and per placement, as the features stage ranks
    them (ties: more impressions, then ``ad_id``)."""
    per_placement = (
        train.groupby(["placement_id", "ad_id"])["label"]
        .agg(clicks="sum", impressions="size")
        .reset_index()
    )
    overall = per_placement.groupby("ad_id")[["clicks", "impressions"]].sum().reset_index()
    overall["placement_id"] = ALL_PLACEMENTS
    lists = pd.concat([per_placement, overall], ignore_index=True)
    lists = lists.sort_values(
        ["placement_id", "clicks", "impressions", "ad_id"], ascending=[True, False, False, True]
    )
    lists["rank"] = lists.groupby("placement_id").cumcount().astype("int32") + 1
    lists = lists[lists["rank"] <= top_n]
    return lists.astype({"clicks": "int64", "impressions": "int64"})[
        ["placement_id", "ad_id", "clicks", "impressions", "rank"]
    ].reset_index(drop=True)
