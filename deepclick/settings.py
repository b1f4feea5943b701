"""One typed settings object for every deepclick component.

Loaded once at the edge (CLI, API start-up, DAG task) and passed down; no other module reads the
environment. Sources, strongest first: explicit keyword arguments, ``DEEPCLICK_*`` environment
variables (nested keys joined by ``__``, e.g. ``DEEPCLICK_SPARK__MASTER``), the YAML file, defaults.
The defaults work on a fresh machine: all state lives under ``root`` (``./var``).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from deepclick import layout
from deepclick.errors import DeepclickError

CONFIG_ENV_VAR = "DEEPCLICK_CONFIG"


class _Section(BaseModel):
    """A settings section: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


class SparkSettings(_Section):
    master: str = "local[*]"
    app_name: str = "deepclick"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, ge=1)
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    extra_conf: dict[str, str] = Field(default_factory=dict)


class SimulateSettings(_Section):
    """Size and shape of the generated ad marketplace (see pipelines/simulate)."""

    seed: int = 7
    start_date: str = "2024-01-01"
    days: int = Field(4, ge=1)
    impressions_per_day: int = Field(50_000, ge=100)
    num_users: int = Field(20_000, ge=10)
    num_placements: int = Field(200, ge=4)
    num_advertisers: int = Field(300, ge=2)
    num_ads: int = Field(5_000, ge=10)
    new_ads_per_day: float = Field(0.03, ge=0, le=1)
    new_placements_per_day: float = Field(0.03, ge=0, le=1)
    latent_dim: int = Field(8, ge=2)
    target_ctr: float = Field(0.03, gt=0, lt=0.5)
    ads_retired_per_day: float = Field(
        0.01, ge=0, le=1, description="daily chance that a live ad stops serving (campaign ends)"
    )
    signal_strength: float = Field(
        1.0, ge=0, description="std of the user×context×ad match logit over random triples"
    )
    targeted_share: float = Field(
        0.6, ge=0, le=1, description="share of impressions the logging ad server targets"
    )
    targeting_candidates: int = Field(
        10, ge=1, description="random live ads the targeting policy scores per impression"
    )


class FeatureSettings(_Section):
    min_count: int = Field(2, ge=1, description="vocabulary entries seen fewer times map to OOV")
    oov_buckets: int = Field(1, ge=1)
    ctr_prior_strength: float = Field(
        20.0, gt=0, description="pseudo-impressions of the global CTR added when smoothing"
    )
    train_days: int = Field(30, ge=1, description="days before the target day used for training")
    min_train_days: int = Field(1, ge=1)
    history_days: int = Field(
        0,
        ge=0,
        description="look-back of the <role>__hist_* features: the N days before a row's day "
        "(read from before the training window too), impressions and clicks per log day of it; "
        "0: cumulative counts over every earlier day read (pipelines/features/nodes.py)",
    )
    popularity_top_n: int = Field(200, ge=1, description="ads kept per popularity list")
    rows_per_file: int = Field(
        2_000_000, ge=1000, description="target rows per Parquet file of the features tables"
    )


class TwoTowerSettings(_Section):
    embedding_dim: int = Field(32, ge=2)
    hidden_units: list[int] = Field(default_factory=lambda: [64])
    epochs: int = Field(
        3,
        ge=1,
        description="passes over the clicks; more over-fits the ids (medium day 8, mixed "
        "negatives: 10 epochs at batch 256 gave recall@500 0.96x popularity, 3 at 512 1.08x)",
    )
    batch_size: int = Field(512, ge=8)
    learning_rate: float = Field(0.01, gt=0)
    temperature: float = Field(1.0, gt=0)
    seed: int = 7
    feature_embedding_dim: int = Field(
        16, ge=1, description="size of each categorical feature's embedding inside a tower"
    )
    exclude_features: list[str] = Field(
        default_factory=list, description="spec features the towers must not read (by name)"
    )
    history_features: bool = Field(
        False,
        description="towers also read the <role>__hist_* features (off: measured worse recall "
        "and cold start, see models/two_tower/towers.py)",
    )
    id_dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of training rows whose id embedding is zeroed, so towers also place "
        "entities from their features alone (cold-start ads and users)",
    )
    embed_on: Literal["auto", "spark", "driver"] = Field(
        "auto",
        description="where the embed stage runs the towers: 'spark' (mapInPandas, one SavedModel "
        "per Python worker: what a cluster needs), 'driver' (one process, the tower loaded once), "
        "'auto' = driver on a local master, where Spark's workers share the driver's cores and "
        "each paid a TensorFlow import (daily test world: embed 14-18 s of CPU per day, see "
        "pipelines/embed.py)",
    )
    uniform_negatives: int = Field(
        1024,
        ge=0,
        description="ads drawn uniformly from the catalogue as extra negatives of every batch "
        "(mixed negative sampling, models/two_tower/model.py; 0: in-batch only). Medium day 8, "
        "2000 clicks, exact search: similarity alone recall@500 0.78x -> 0.94x popularity, with "
        "the prior (weight 2) 1.05x -> 1.08x (README 'Candidates', bench/funnel_towers.py)",
    )


MARKETPLACE_USER_FIELDS: tuple[str, ...] = (
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
)
"""The user profile fields the generated world's user factor is drawn from
(``pipelines.simulate.world``)."""
MARKETPLACE_CONTEXT_FIELDS: tuple[str, ...] = ("page_type", "slot_size")
"""The placement fields its placement factor is drawn from."""
MARKETPLACE_AD_FIELDS: tuple[str, ...] = ("cate_id", "brand")
"""The ad fields its ad factor is drawn from."""
MARKETPLACE_CROSSES: tuple[str, ...] = tuple(
    f"{left}*{right}"
    for left in (*MARKETPLACE_USER_FIELDS, *MARKETPLACE_CONTEXT_FIELDS)
    for right in MARKETPLACE_AD_FIELDS
)
"""The fields the generated world's latent match is drawn from: a user's profile and a
placement's page type and slot, each crossed with an ad's category and brand. Named by field, so a
spec without them (a real log) skips them."""


class RankerSettings(_Section):
    architecture: Literal["dcn_v2", "deepfm"] = "dcn_v2"
    embedding_dim: int = Field(8, ge=2)
    cross_layers: int = Field(2, ge=0)
    hidden_units: list[int] = Field(default_factory=lambda: [64, 32])
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1024, ge=8)
    learning_rate: float = Field(0.003, gt=0)
    negative_sampling_rate: float = Field(
        1.0, gt=0, le=1, description="fraction of negatives kept; corrected after training"
    )
    max_fit_rows: int = Field(
        2_000_000,
        ge=1_000,
        description="fit rows held in memory at most (the larger of the network's and the wide "
        "part's): a window holding more keeps every click and a share of the negatives below "
        "negative_sampling_rate, corrected the same way. 10M impressions with every negative "
        "kept (7.5M wide rows) took 22.5 GB and was killed on a 23 GB machine; the demo and "
        "medium worlds (at most 1.05M fit rows) are below it, so unchanged",
    )
    calibration: Literal["platt", "isotonic", "none"] = "platt"
    calibration_significance: float | None = Field(
        0.05,
        gt=0,
        lt=1,
        description="platt: apply the fitted head only when it beats the identity on the "
        "held-out rows by a likelihood-ratio test at this level (null: always). Demo D "
        "2024-01-03 (one ranker day, 64 held-out clicks): always 1.163 predicted/observed clicks, "
        "refused; tested 1.047 (docs/history/model-quality.md)",
    )
    seed: int = 7
    cross_low_rank: int = Field(
        0, ge=0, description="rank of each DCN-v2 cross matrix (U·Vᵀ); 0 keeps it full rank"
    )
    dropout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="dropout after each deep layer; steadies the calibration carried from the "
        "held-out day to the next (planted data: 1.01-1.05 across seeds vs 1.03-1.16 without)",
    )
    embedding_l2: float = Field(
        1e-4,
        ge=0,
        description="L2 penalty on the embedding tables; without it the id embeddings over-fit "
        "(simulated marketplace: AUC 0.672 at 0, 0.739 at 1e-4, LR baseline 0.712)",
    )
    calibration_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="share of rows held out for calibration and early stopping with holdout "
        "'fraction' or one training day",
    )
    holdout: Literal["last_day", "fraction"] = Field(
        "last_day",
        description="rows held out of the fit for calibration and early stopping: the last "
        "training day (one training day: calibration_fraction of it), or calibration_fraction "
        "of every day. Default last_day with the crosses below (docs/history/model-quality.md, "
        "'Crosses in the ranker's wide part'); without crosses, demo D 2024-01-04: fraction AUC "
        "0.6967, calibration 1.037 (36k fit rows); last_day 0.6859, 0.941 (20k)",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="stop after this many epochs without a better held-out AUC and keep the "
        "best epoch (0: train all epochs)",
    )
    wide: bool = Field(
        True,
        description="dcn_v2: add a first-order part to the logit, one weight per categorical "
        "value and per standardised number (models/ranker/model.py, _wide); demo D 2024-01-04, "
        "same split: AUC 0.6563 without, 0.6859 with (one-hot LR on the ranker's days 0.6958)",
    )
    wide_fit: Literal["logistic", "joint"] = Field(
        "logistic",
        description="logistic: solve the wide part first as an L2 logistic regression (C = "
        "wide_c), freeze it, and let the network learn the residual; joint: train it with the "
        "network by Adam (L2 wide_l2). Planted per-id-bias folder (tests/test_ranker_wide.py): "
        "logistic 0.7738, joint 0.7664, no wide part 0.7624, one-hot LR 0.7739",
    )
    wide_c: float = Field(
        0.1,
        gt=0,
        description="inverse L2 strength of the wide fit (scikit-learn's C) when wide_c_grid "
        "holds fewer than two values. Alone, 0.03 won AUC on 7 demo and medium seeds and the "
        "slate on 6 (paired with 0.1: demo slate +0.035 to +0.069 of the oracle, medium +0.003 "
        "to +0.022), lost the slate at 10M (-0.009 [-0.016, -0.001]) and raised TalkingData's "
        "calibration on D (1.16 -> 1.33); less L2 (0.3, 1.0) lost heavily at medium: no single "
        "C wins everywhere, hence wide_c_grid",
    )
    wide_c_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [0.03, 0.1, 0.3],
        description="two or more values: the wide fit is solved once per C and the one with "
        "the lowest log loss of the wide part alone on the held-out rows is kept (wide_c "
        "ignored); the chosen C and each one's loss are training metrics. Default chosen with "
        "bench/ranker_split.py (seed 7, paired with C 0.1 on D): it picks 0.03 at demo scale "
        "(AUC +0.011, slate +0.035), medium (AUC +0.0046 [+0.0032, +0.0062]) and 10M (AUC "
        "+0.0037, slate -0.009) and 0.3 on TalkingData (AUC +0.006, calibration 1.13 vs 1.16). "
        "One fit per value up to the first rise of the loss, two at a time (wide_grid_threads; "
        "docs/history/model-quality.md, session 19)",
    )
    wide_grid_threads: int = Field(
        2,
        ge=1,
        description="wide_c_grid values solved side by side (threads: the sparse products "
        "release the GIL); the grid is walked from the strongest L2 and stops once the "
        "held-out loss rises. 10M rows of D 2024-01-08, 2 cores: C 0.03 and 0.1 alone 86 s + "
        "139 s, side by side 164 s wall, the same weights to the bit; 0.3 (212 s) no longer "
        "solved once 0.1 lost",
    )
    wide_prior_scale: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="feature name -> prior std of its wide weights relative to the others' "
        "(its one-hot columns are scaled by it before the L2 fit, so its weights' prior "
        "variance is C x scale^2); a feature the spec lacks is ignored. Off: {'ad_id': 3} won "
        "the medium slate on seeds 7 / 8 (+0.017 [+0.011, +0.024] / +0.008 [+0.002, +0.015] "
        "of the oracle, AUC within noise) but lost AUC at demo scale (-0.0036 [-0.0073, "
        "-0.0006]) and on TalkingData (-0.012 [-0.026, -0.001]) (docs/history/model-quality.md, "
        "session 15)",
    )
    wide_refit_variance: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="feature name -> prior variance of a random effect per value fitted on top "
        "of the solved wide part (models/ranker/wide.py, refit_feature_weights): every other "
        "weight stays, so new values (D's new ads) score as before; a feature the spec lacks "
        "is ignored. Off: {'ad_id': 0.1} won the medium slate on seed 7 (+0.013 [+0.007, "
        "+0.019]) and lost the demo slate on seed 8 (-0.011 [-0.016, -0.008], AUC -0.0027 "
        "[-0.0049, -0.0009]) (docs/history/model-quality.md, session 15)",
    )
    wide_days: Literal["ranker", "all"] = Field(
        "all",
        description="rows the wide part is fitted on (wide_fit logistic): the ranker's own fit "
        "rows, or the fit rows of every training day (it reads no two-tower score, so the "
        "towers' days cannot leak into it; held-out rows stay out). Default all with the "
        "crosses below; without crosses, demo D 2024-01-04: all 0.6938 (calibration 1.245) vs "
        "ranker 0.6967 (1.037) with holdout fraction, 0.6828 vs 0.6859 with last_day",
    )
    wide_day_feature_min_days: int = Field(
        2,
        ge=0,
        description="a categorical feature constant within each training day (the day of the "
        "week) keeps its own wide weight only for values seen on at least this many days; the "
        "others get the row-weighted mean weight (0: off). Medium D 2024-01-08 (a Monday; the "
        "only Monday was the log's first day): 0 gave 1.418 predicted/observed clicks, 2 gives "
        "0.997 at the same AUC 0.7273; demo D 2024-01-04: 0.957 / 0.944, AUC 0.6943 / 0.6926",
    )
    wide_l2: float = Field(
        1e-4, ge=0, description="L2 penalty of the wide weights when wide_fit is joint"
    )
    calibrate_on: Literal["holdout", "last_day"] = Field(
        "holdout",
        description="held-out rows the calibration head is fitted on: all of them, or those of "
        "the last training day only (the nearest to D, when the fit rows reach further back)",
    )
    crosses: list[str] = Field(
        default_factory=lambda: list(MARKETPLACE_CROSSES),
        description="feature pairs 'a*b' crossed in the wide part (dcn_v2 with wide): one "
        "weight per pair of values, fitted with the wide part (models/ranker/crosses.py); a side "
        "is a categorical feature's name or its field (the part after the last '__'); a pair the "
        "feature spec lacks is skipped ([] turns them off). Default MARKETPLACE_CROSSES (the "
        "Taobao-layout profile, page and ad fields) with wide_days all and holdout last_day: on "
        "demo D 2024-01-04, seeds 7 / 8, top-10 slate +0.064 / +0.092 of the oracle over no "
        "crosses (paired CIs above 0), AUC -0.0024 / +0.0024 (CIs across 0), calibration "
        "0.957 / 0.941 (docs/history/model-quality.md, 'Crosses in the ranker's wide part')",
    )
    cross_buckets: int = Field(
        1 << 18,
        ge=16,
        description="largest weight table of one cross; a pair with more value combinations is "
        "hashed into this many rows",
    )
    fm_blend: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="weight w of the window FM in the served logit, (1 - w) x calibrated ranker "
        "+ w x FM (models/ranker/fm.py: an FM with per-ad effects fitted on every training "
        "day and the held-out rows, then frozen; deepfm ignores it); 0: no FM. 0.3 against 0 "
        "on the same requests and rows: medium top-10 slate +0.030 [+0.024, +0.037] of the oracle, "
        "AUC +0.0014 [+0.0005, +0.0026]; demo seed 7 +0.010 [+0.005, +0.015], AUC +0.0098 "
        "[+0.0028, +0.0169], seed 8 +0.005 [-0.001, +0.012], AUC +0.0008; TalkingData AUC "
        "+0.0004 [-0.0007, +0.0020]. 0.5 slates more at medium (+0.012 over 0.3) and less at "
        "demo (-0.006), AUC -0.0010 / -0.0027 against 0.3 (docs/history/model-quality.md, "
        "session 17)",
    )
    fm_dim: int = Field(8, ge=1, description="rank of the FM's query x ad product")
    fm_l2: float = Field(1e-5, ge=0, description="L2 on the FM's tables (per batch, as Keras)")
    fm_epochs: int = Field(3, ge=1, description="Adam epochs of the FM over its rows")
    fm_ad_effect_variance: float = Field(
        0.3, ge=0, description="prior variance of the FM's per-ad random effect (0: none)"
    )
    fm_ad_vector_variance: float = Field(
        0.0,
        ge=0,
        description="prior variance of each component of a per-ad correction to the FM's ad "
        "vector, fitted with the per-ad effect as one random slope per ad on the query's FM "
        "vector (models/ranker/wide.py, random_slopes); 0: the scalar effect only. Off: 0.3 "
        "slates +0.006 [+0.000, +0.011] of the oracle at medium at AUC -0.0004 [-0.0011, "
        "+0.0002], and loses the demo slate, -0.006 [-0.011, -0.001] (docs/history/"
        "model-quality.md, session 23)",
    )
    fm_ad_vector_grid: list[PositiveFloat] = Field(
        default_factory=list,
        description="with two or more values, fm_ad_vector_variance is chosen among them as "
        "the one whose fitted vectors have the highest Laplace log evidence on the FM's rows "
        "(models/ranker/wide.py, slopes_log_evidence): the prior's width from the rows per ad. "
        "Off: over 0.01-1 the evidence picks 0.01 at demo and medium (both seeds), which "
        "leaves the slate and AUC level with the default (session 23)",
    )
    baseline: bool = Field(
        True, description="also train the hashed logistic-regression baseline on the same split"
    )
    baseline_hash_bits: int = Field(
        18, ge=8, le=26, description="the baseline hashes features into 2**bits columns"
    )


class IndexSettings(_Section):
    metric: Literal["dot", "angular"] = Field(
        "angular", description="measured on real two-tower vectors: candidates/index.py"
    )
    n_trees: int = Field(100, ge=1)
    search_k: int = Field(-1, description="ANNOY search_k; -1 lets ANNOY choose n_trees * k")
    tune_search_k: bool = Field(
        True, description="double search_k at build time until the recall floor is met"
    )
    recall_k: int = Field(100, ge=1)
    recall_queries: int = Field(200, ge=1)
    recall_floor: float = Field(0.9, ge=0, le=1, description="builds below this are not published")
    popular_quota: float = Field(
        0.1, ge=0, le=1, description="share of candidates from popular ads"
    )
    prior_weight: float = Field(
        2.0,
        ge=0,
        description="weight of log(training clicks + prior_smoothing) added to query·ad when "
        "ordering candidates (0: similarity only); recorded in the index (candidates/funnel.py)",
    )
    prior_smoothing: float = Field(1.0, gt=0, description="clicks added before the log")
    explore_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of candidates chosen by similarity alone",
    )
    fresh_share: float = Field(
        0.02,
        ge=0,
        le=0.2,
        description="share of candidates kept for ads without rows in the training window (new "
        "ads), best query·ad among them; counted apart by the funnel check (candidates/funnel.py), "
        "so at most 0.2: the check judges the rest of every list against popularity",
    )
    funnel_refuse: bool = Field(
        True,
        description="refuse to publish an index whose candidates hold fewer of D's clicks than "
        "as many most clicked ads at any K of lifecycle.recall_ks",
    )
    funnel_tolerance: float = Field(
        0.0, ge=0, le=1, description="recall the candidates may lose to popularity (absolute)"
    )
    funnel_z: float = Field(
        1.645,
        ge=0,
        description="and by more than this many standard errors of the paired per-click "
        "difference (0: the strict rule; 1.645: a one-sided 95% test)",
    )
    funnel_min_clicks: int = Field(
        200,
        ge=1,
        description="fewer sampled clicks on D cannot decide: the index is published and the "
        "manifest says insufficient_evidence",
    )
    seed: int = 7


class PredictorSettings(_Section):
    backend: Literal["in_process", "grpc", "rest"] = "in_process"
    target: str = Field("localhost:8500", description="host:port (gRPC) or base URL (REST)")
    model_name: str = "ranker"
    signature: Literal["rank", "serving_default"] = "rank"
    timeout_ms: int = Field(50, ge=1)
    tf_threads: int = Field(
        1,
        ge=0,
        description="in_process: TF intra/inter-op threads per worker (0: TF's default, one per "
        "core; 1 avoids oversubscription when several workers share the cores)",
    )
    inprocess_pool: int = Field(
        4, ge=1, description="in_process: threads running predictions (deadline enforcement)"
    )
    xla: bool = Field(
        False,
        description="in_process, with tflite off: compile the ranker's numeric call with XLA "
        "(rows padded to 64/128/.../2048, up to 512 compiled at load, ~1.5 s each); off: "
        "bench.serving measured "
        "no gain over the plain indexed call (docs/history/serving.md)",
    )
    tflite: bool = Field(
        True,
        description="in_process: run the ranker's numeric call on the export's TensorFlow Lite "
        "model (checked against the SavedModel at export and at load; bench.serving: about half "
        "the CPU of the SavedModel call); off, or a version without a usable one: the SavedModel",
    )


class ServingSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    default_candidates: int = Field(500, ge=1)
    max_candidates: int = Field(2000, ge=1)
    reload_interval_s: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    max_exclude_ads: int = Field(1000, ge=0, description="longest exclude_ad_ids list accepted")
    timezone: str = Field(
        "UTC",
        description="zone of the request-time features ctx__hour/ctx__dow when the feature spec "
        "does not name one (it must match the dataset spec's event_time.timezone)",
    )
    warmup_timeout_s: float = Field(
        60.0, gt=0, description="deadline of the warmup prediction that validates a release"
    )
    max_in_flight: int = Field(
        4, ge=1, description="/v1/rank requests one worker serves at once; beyond it a fast 503 "
        "with Retry-After (admission control: overload is answered, not queued); 4 measured "
        "best with the SavedModel call and micro-batching (bench.serving --concurrency-sweep: "
        "1.6-2.4x the ranked answers/s of 2 at 8-32 connections, where 8 with 4,000-row batches "
        "mostly missed the ranker's deadline); kept with the TFLite call, batching off",
    )  # fmt: skip
    request_deadline_ms: int = Field(
        250, ge=1, description="end-to-end budget of a /v1/rank request from arrival: a request "
        "that waited past it is answered 503, and the ranker gets only what is left of it",
    )  # fmt: skip
    body_timeout_s: float = Field(
        5.0, gt=0, description="a request body not received within this time gets 408"
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="requests with more header bytes get 431"
    )
    batch_max_rows: int = Field(
        0, ge=0, description="micro-batching: requests reaching the ranker together are "
        "scored in one call of at most this many candidate rows (0: off, each request alone). "
        "Off by default since the TFLite call: re-swept with 2 workers at 1/8/32 connections "
        "(bench.serving --concurrency-sweep, docs/history/serving.md), off answered 131/131 "
        "req/s at 8/32 with no degraded answer; 1000-4000 rows 80-134 req/s with up to 18% "
        "(8 connections) and 56-95% (32) of the answers degraded at the ranker's deadline "
        "(a queued request waits for the call ahead of it, and a TFLite call of 1,000-2,000 "
        "rows saves little CPU)",
    )  # fmt: skip
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="micro-batching: how long the first request of a batch waits for "
        "others (0: none; requests that arrive during a call join the next one)",
    )  # fmt: skip
    blas_threads: int = Field(
        1, ge=0, description="numpy BLAS threads per worker (exact candidate search); 1 avoids "
        "oversubscription when one worker runs per core, 0 keeps the library's default",
    )  # fmt: skip
    candidate_search: Literal["auto", "exact", "ann"] = Field(
        "auto", description="neighbour search of the candidate stage: exact (a BLAS scan, "
        "recall 1.0), ann (ANNOY), or auto: the one the index build measured faster for its "
        "catalogue and dimension (manifest search.mode)",
    )  # fmt: skip


class MlflowSettings(_Section):
    tracking_uri: str | None = Field(None, description="default: SQLite store under root")
    experiment: str = "deepclick"
    enabled: bool = Field(
        True, description="track daily runs and register models (off: ledgers only, no MLflow)"
    )
    ranker_model: str = Field("deepclick-ranker", description="registered model of the ranker")
    towers_model: str = Field("deepclick-towers", description="registered model of the towers")


class LifecycleSettings(_Section):
    """The daily retraining lifecycle (lifecycle/daily.py, lifecycle/registry.py, airflow_dags/):
    what a daily run reads, how a new model is judged against the champion, how Airflow runs it."""

    dataset: str = Field("marketplace", description="dataset spec of the daily runs")
    source: Path | None = Field(
        None,
        description="raw logs: a folder of <YYYY-MM-DD> day folders, or one file/folder holding "
        "every day (default: <root>/raw/<dataset>)",
    )
    ranker_similarity: bool = Field(
        True,
        description="the ranker takes the two-tower scores of D's embeddings as inputs (and "
        "so trains on the last ranker_days days only). Kept by measurement (bench/ranker_split."
        "py, demo D 2024-01-04, ranker seeds 7 / 8): off, i.e. the ranker on all 3 training "
        "days without the scores, AUC +0.0029 [-0.0044, +0.0119] / +0.0015 [-0.0061, +0.0093] "
        "(paired, not significant) with calibration 1.174 / 1.454 against 1.013 / 1.104",
    )
    ranker_days: int = Field(
        2,
        ge=1,
        description="with ranker_similarity: the last days of the training window, which the "
        "towers leave out and the ranker trains (and, on the last one, calibrates) on, so the "
        "scores never saw the ranker's clicks (pipelines/training_days.py)",
    )
    refit_towers: bool = Field(
        False,
        description="with ranker_similarity: train the towers a second time on the whole "
        "window and serve those (embeddings, index, the ranker's scores online and on D); the "
        "ranker still trains on the scores of towers that never saw its days. Off by "
        "measurement (README 'Models'): on generated data it lifts the funnel (recall@500 "
        "1.00x -> 1.06x popularity at demo and medium scale; replay 0.706 -> 0.711 of the "
        "oracle at medium) with AUC and calibration level, but on TalkingData D 2017-11-09 the "
        "ranker over-predicted (calibration 1.13 -> 1.38 [1.07, 1.81], refused): the refitted "
        "towers' scores spread 4-5x wider than those it standardised in training. Read on the "
        "trained scale (models.ranker.train.on_served_scores) it passes (1.24 [0.96, 1.63]) "
        "and the funnel gains stay; at 10M recall@100 1.09x -> 1.06x, @500 1.10x -> 1.11x, "
        "calibration 1.001 -> 0.983 [0.973, 0.993]: not a win everywhere",
    )
    eval_bootstrap: int = Field(100, ge=0, description="resamples of the AUC confidence interval")
    recall_ks: list[int] = Field(
        default_factory=lambda: [50, 100, 500], description="cut-offs of the retrieval evaluation"
    )
    recall_queries: int = Field(2000, ge=1, description="clicked impressions sampled per eval")
    retrieval_als: bool = Field(False, description="also train the ALS baseline when evaluating")
    gate_min_auc: float = Field(
        0.55, ge=0, le=1, description="absolute floor of the ranker's AUC on the evaluation day"
    )
    gate_auc_tolerance: float = Field(
        0.005, ge=0, description="a challenger may lose at most this much AUC to the champion"
    )
    gate_calibration_min: float = Field(
        0.98,
        gt=0,
        description="lowest predicted/observed clicks the ratio's interval (from the interval of "
        "D's click count) must reach; the interval, not this tolerance, dominates on small days",
    )
    gate_calibration_max: float = Field(
        1.02, gt=0, description="highest predicted/observed clicks the interval must reach"
    )
    gate_min_clicks: int = Field(
        100, ge=0, description="fewer clicks on D: insufficient evidence, the champion stays"
    )
    gate_peers: bool = Field(
        True,
        description="refuse a ranker whose AUC is below the best peer's beyond the paired CI",
    )
    peers: list[Literal["logistic_regression", "gbdt", "ad_ctr_prior"]] = Field(
        default_factory=lambda: ["logistic_regression", "gbdt", "ad_ctr_prior"],
        description="peers fitted on the training days and scored on D beside the ranker",
    )
    peer_max_rows: int = Field(
        300_000, ge=100, description="training rows the peers are fitted on (seeded sample)"
    )
    replay_requests: int = Field(
        1000, ge=0, description="requests of D replayed against the truth (0: no replay)"
    )
    replay_all_ads: int = Field(
        200,
        ge=0,
        description="of the replayed requests, how many the ranker also answers over every live "
        "ad (no candidate stage; it scores the whole catalogue per request); 0: none",
    )
    gate_recall_method: Literal["two_tower_ann", "two_tower_popular"] = Field(
        "two_tower_ann",
        description="retriever whose recall@K is gated: the ANNOY index alone, or with the "
        "popular quota serving merges in (index.popular_quota)",
    )
    gate_recall_k: int = Field(100, ge=1, description="K of the gated recall@K (in recall_ks)")
    gate_recall_tolerance: float = Field(
        0.01, ge=0, description="a challenger may lose at most this much recall@K to the champion"
    )
    gate_min_recall: float = Field(0.0, ge=0, le=1, description="absolute floor of recall@K")
    schedule: str = Field("0 0 * * *", description="cron of the DAG; D = the interval's start")
    start_date: str = Field("2024-01-01", description="first logical date of the DAG")
    catchup: bool = Field(False, description="Airflow runs every missed day since start_date")
    retries: int = Field(2, ge=0, description="retries of each DAG task")
    retry_delay_s: float = Field(300.0, ge=0, description="delay before the first retry")
    retry_backoff: float = Field(2.0, ge=0, description="delay multiplier per retry (0: constant)")
    max_retry_delay_s: float = Field(3600.0, ge=0, description="cap of the retry delay")
    spark_submit_conn_id: str = Field(
        "spark_default", description="cluster DAG: Airflow connection of spark-submit"
    )
    spark_submit_conf: dict[str, str] = Field(
        default_factory=dict, description="cluster DAG: --conf key=value of every submission"
    )
    spark_submit_py_files: str | None = Field(
        None, description="cluster DAG: --py-files shipping deepclick when not installed there"
    )
    spark_submit_env: dict[str, str] = Field(
        default_factory=dict, description="cluster DAG: environment of the submitted driver"
    )

    @model_validator(mode="after")
    def _consistent(self) -> LifecycleSettings:
        if self.gate_calibration_min >= self.gate_calibration_max:
            raise ValueError(
                f"gate_calibration_min ({self.gate_calibration_min}) must be below "
                f"gate_calibration_max ({self.gate_calibration_max})"
            )
        if self.gate_recall_k not in self.recall_ks:
            raise ValueError(
                f"gate_recall_k {self.gate_recall_k} is not among recall_ks {self.recall_ks}: "
                "the gate can only compare a recall the evaluation measures"
            )
        dt.date.fromisoformat(self.start_date)
        return self


class Settings(BaseSettings):
    """Everything a deepclick process may be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="DEEPCLICK_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    root: Path = Path("var")
    spark: SparkSettings = Field(default_factory=SparkSettings)
    simulate: SimulateSettings = Field(default_factory=SimulateSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    two_tower: TwoTowerSettings = Field(default_factory=TwoTowerSettings)
    ranker: RankerSettings = Field(default_factory=RankerSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    predictor: PredictorSettings = Field(default_factory=PredictorSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)

    @model_validator(mode="after")
    def _absolute_root(self) -> Settings:
        self.root = self.root.expanduser().resolve()
        return self

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{layout.mlflow_dir(self.root) / 'mlflow.db'}"

    @property
    def mlflow_artifact_location(self) -> str:
        return (layout.mlflow_dir(self.root) / "artifacts").as_uri()

    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)


class SettingsError(DeepclickError, ValueError):
    """Settings that cannot be used; the message names every offending key."""


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from a YAML file (optional), the environment and explicit overrides.

    ``config`` defaults to the file named by ``DEEPCLICK_CONFIG``. A missing file or an invalid
    value raises :class:`SettingsError` naming the key, so a bad deployment fails at start-up.
    """
    path = config if config is not None else os.environ.get(CONFIG_ENV_VAR)
    yaml_file = Path(path) if path else None
    if yaml_file is not None and not yaml_file.is_file():
        raise SettingsError(f"settings file {yaml_file} does not exist")
    Settings._yaml_file = yaml_file
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        source = f" (from {yaml_file})" if yaml_file else ""
        raise SettingsError(f"invalid settings{source}: {problems}") from None
    finally:
        Settings._yaml_file = None
