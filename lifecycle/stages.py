"""The stages of the daily run for one day D: what each reads, what it does, what it publishes.

DESIGN.md's flow as a list of :class:`Stage` objects — ingest → features → towers → embed → index →
ranker → evaluate → gate → publish. Each stage declares

- ``config``: the settings it depends on, and ``inputs``: the upstream manifests it reads (for
  ingest: the source files' names, sizes and mtimes). With the package version they make the
  stage's fingerprint, which ``lifecycle/daily.py`` compares to decide whether a re-run may skip it;
- ``run``: takes what ``inputs`` read (read once: the fingerprint and the run see the same
  manifests), calls the stage's runner in ``pipelines/`` with D's folders from the
  :class:`DayContext` and those inputs — the runner derives no path and re-reads nothing — and
  returns an :class:`Outcome` naming the published folder and what the tracker should log.

This module is the wiring (kedro's ``pipeline.py``); the work is in the runners. Stages find each
other's outputs through ``deepclick.layout`` (``<parent>/<YYYYMMDD>``), never through memory, so any
stage can run alone in its own process (a per-stage command, an Airflow task, a spark-submit
driver). Nothing here calls MLflow: registering and mirroring decisions is the runner's job,
through the tracker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepclick import layout
from deepclick.errors import DeepclickError
from deepclick.layout import (
    PARTITION_MANIFEST,
    RANKER_MANIFEST,
    RELEASE_FILE,
    SPEC_FILE,
    DayLayout,
    challengers_dir,
    truth_dir,
)
from deepclick.publish import (
    MANIFEST,
    NotPublishedError,
    publishing,
    read_manifest,
    set_current,
    sha256_file,
    verify,
)
from deepclick.settings import Settings
from lifecycle.gate import (
    EARLIER_CHAMPION,
    PAIRED,
    SAME_DAY,
    champion_basis,
    decide,
    recall_metric,
    recorded_champion_metrics,
)
from lifecycle.registry import (
    PROMOTED,
    REFUSED,
    ModelKind,
    append_decision,
    current_champion,
    find_decision,
)
from lifecycle.tracking import numeric

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

"""The exported ranker's manifest (models.ranker.predictor.RANKER_MANIFEST, not imported from
there: that would load TensorFlow to schedule a Spark stage)."""
SUMMARY_FILE = "summary.json"
"""Under the root: the challenger of each day as a release that is never served (the replay's)."""
DECISION_FILE = "decision.json"
EVAL_COLUMNS = ["event_id", "user_id", "placement_id", "ad_id", "label"]
RECALL_HITS_FILE = "recall_hits.parquet"
"""Per sampled click of D, whether each K's candidates held the clicked ad (:func:`recall_on_day`),
beside ``summary.json`` of an evaluation and in the gate's ``champion/`` folder."""


class StageInputError(DeepclickError, RuntimeError):
    """A stage's inputs are not there (an upstream stage has not published for D, no raw logs)."""


class ChampionUnavailableError(DeepclickError, RuntimeError):
    """The champion's published folders are gone or were republished: it cannot be re-measured."""


Upstream = dict[str, Any]
"""What a stage's ``inputs`` read: the upstream manifests (for ingest, the source files), keyed by
the name of D's folder they describe. Fingerprinted, then handed to the stage's ``run``."""


@dataclass
class DayContext(DayLayout):
    """One day's run: the settings, D, where its raw logs are, and (lazily) a Spark session.

    It is D's :class:`~deepclick.layout.DayLayout` under ``settings.root``: every stage reads and
    writes the folders it names (``ctx.features``, ``ctx.index`` …), derived there and only there.
    """

    settings: Settings
    date: dt.date
    dataset: str
    source: Path
    spark_session: SparkSession | None = None
    registered: dict[str, str | None] = field(default_factory=dict)
    """MLflow versions of D's towers and ranker (from the run ledger), for decision records."""
    _feature_inputs: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        DayLayout.__init__(self, self.settings.root, self.date, self.settings.predictor.model_name)

    def spark(self) -> SparkSession:
        if self.spark_session is None:
            from pipelines.spark import get_spark

            self.spark_session = get_spark(self.settings.spark)
        return self.spark_session

    def spec(self) -> Any:
        from pipelines.specs import load_spec

        return load_spec(self.dataset)

    def feature_inputs(self) -> Any:
        """The event partitions and side snapshots D's features are built from
        (``pipelines.features.runner.find_inputs``), chosen once per run: the features stage
        fingerprints them and hands the same ones to its runner."""
        if self._feature_inputs is None:
            from pipelines.features.runner import find_inputs

            self._feature_inputs = find_inputs(
                layout.warehouse(self.settings.root),
                self.date,
                self.settings.features,
                self.spec().name,
            )
        return self._feature_inputs

    def truth_dir(self) -> Path | None:
        """The simulator's ground truth of this dataset, when there is one (generated data)."""
        folder = truth_dir(self.settings.root, self.spec().name)
        return folder if folder.is_dir() else None


@dataclass
class Outcome:
    """What a stage published, for the run ledger, the console and the tracker."""

    output: Path | None
    manifest_name: str = MANIFEST
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Kept in the stage's ledger entry (e.g. the decision id the publish stage recorded)."""


@dataclass(frozen=True)
class Stage:
    """One step of the daily run (see the module docstring)."""

    name: str
    run: Callable[[DayContext, Upstream], Outcome]
    """Runs the stage on what ``inputs`` returned (read once: the fingerprint and the run see
    the same manifests) and the folders the context names; returns what it published."""
    inputs: Callable[[DayContext], Upstream]
    config: Callable[[DayContext], dict[str, Any]]
    uses_spark: bool = False
    registers: ModelKind | None = None
    """The registered model its output is a new version of (towers, ranker)."""
    protects: tuple[str, ...] = ()
    """D's folders (DayContext attributes) that re-running this stage republishes, itself or by
    forcing a later stage of D to: the runner refuses while the serving release reads one."""
    adopt: Callable[[DayContext], Outcome | None] | None = None
    """An output published outside the run ledger that may be taken as is (ingest only)."""
    still_valid: Callable[[DayContext, dict[str, Any]], str | None] | None = None
    """Beyond the manifest checksums: why a recorded outcome no longer holds, or None."""


def _manifest(folder: Path, stage: str, what: str, name: str = MANIFEST) -> dict[str, Any]:
    try:
        return read_manifest(folder, name)
    except NotPublishedError:
        raise StageInputError(
            f"stage '{stage}' needs the {what} of this day, which is not published at {folder}; "
            f"run the stage that builds it first"
        ) from None


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the state root when inside it (the root can then be mounted
    elsewhere, as releases allow), else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


# --------------------------------------------------------------------------- ingest


def source_files(ctx: DayContext) -> list[Path]:
    """The raw files of D's source, hidden and ``_``-prefixed ones excluded (as Spark does)."""
    source = ctx.source
    if not source.exists():
        raise StageInputError(
            f"no raw logs for {ctx.date} at {source}; pass --source, or set lifecycle.source to a "
            f"folder of <YYYY-MM-DD> day folders"
        )
    if source.is_file():
        return [source]
    days = sorted(p.name for p in source.iterdir() if p.is_dir() and _is_day(p.name))
    if days:  # a folder of day folders without this day's
        shown = ", ".join(days[:3] + (["…"] if len(days) > 4 else []) + days[3:][-1:])
        raise StageInputError(
            f"no raw logs for {ctx.date}: {source} holds day folders ({shown}) but not "
            f"{ctx.date.isoformat()}"
        )
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(x.startswith((".", "_")) for x in p.relative_to(source).parts)
    )


def _is_day(name: str) -> bool:
    try:
        dt.date.fromisoformat(name)
    except ValueError:
        return False
    return len(name) == 10


def spec_files(ctx: DayContext) -> list[Path]:
    """The files of D's source that the dataset spec reads (its events and side-table globs):
    only these decide whether D must be ingested again, not notes or files beside them."""
    files = source_files(ctx)
    if ctx.source.is_file():
        return files
    spec = ctx.spec()
    read: set[Path] = set()
    for part in [spec.events, *spec.tables.values()]:
        read.update(p for p in ctx.source.glob(part.file) if p.is_file())
    return [p for p in files if p in read]


def _ingest_inputs(ctx: DayContext) -> dict[str, Any]:
    files = []
    for path in spec_files(ctx):
        stat = path.stat()
        name = path.name if path == ctx.source else path.relative_to(ctx.source).as_posix()
        files.append([name, stat.st_size, stat.st_mtime_ns])
    return {"spec": ctx.spec().model_dump(mode="json"), "source": str(ctx.source), "files": files}


def _ingest_outcome(ctx: DayContext, note: str) -> Outcome:
    manifest = read_manifest(ctx.events, PARTITION_MANIFEST)
    return Outcome(
        ctx.events,
        PARTITION_MANIFEST,
        note=note,
        metrics=numeric(manifest.get("counts", {})),
        artifacts=[("ingest", ctx.events / PARTITION_MANIFEST)],
    )


def _ingest_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from pipelines.ingest.runner import run_ingest

    report = run_ingest(ctx.settings, ctx.spec(), ctx.source, ctx.date, spark=ctx.spark())
    outcome = _ingest_outcome(
        ctx, f"{report.rows_written:,} events, {report.rows_quarantined:,} quarantined"
    )
    outcome.metrics.update(
        {
            "rows_in": report.rows_in,
            "rows_other_dates": sum(report.rows_other_dates.values()),
        }
    )
    return outcome


def _ingest_adopt(ctx: DayContext) -> Outcome | None:
    """Take D's events partition as is when it was published from this very source after the
    source's files last changed (e.g. by ``deepclick ingest``): re-ingesting changes nothing."""
    try:
        manifest = verify(ctx.events, PARTITION_MANIFEST)
    except (NotPublishedError, RuntimeError):
        return None
    if manifest.get("source") != str(ctx.source) or manifest.get("dataset") != ctx.spec().name:
        return None
    newest = max((p.stat().st_mtime for p in spec_files(ctx)), default=0.0)
    created = dt.datetime.fromisoformat(str(manifest.get("created_at"))).timestamp()
    if created < newest:
        return None
    return _ingest_outcome(ctx, "adopted: already ingested from this unchanged source")


# --------------------------------------------------------------------------- Spark and TF stages


def _features_inputs(ctx: DayContext) -> Upstream:
    found = ctx.feature_inputs()
    return {
        "events": [p.manifest for p in found.events],
        "side": {s.table: [p.manifest for p in s.used] for s in found.sides.values()},
    }


def _features_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from pipelines.features.runner import run_features

    folder = run_features(ctx.settings, ctx.feature_inputs(), ctx.features, spark=ctx.spark())
    manifest = read_manifest(folder)
    metrics = {**numeric(manifest.get("counts", {})), **numeric(manifest.get("metrics", {}))}
    days = len(manifest.get("train_dates", []))
    return Outcome(
        folder,
        note=f"{metrics.get('train_impressions', 0):,.0f} training rows from {days} day(s)",
        metrics=metrics,
        artifacts=[("features", folder / SPEC_FILE), ("features", folder / MANIFEST)],
    )


def _training_days(ctx: DayContext) -> Any:
    """D's split of the training window (``pipelines.training_days``), from its features."""
    from models.feature_spec import load_feature_spec
    from pipelines.towers import training_days

    return training_days(ctx.settings, load_feature_spec(ctx.features).train_dates)


def similarity_embeddings(ctx: DayContext, days: Any) -> Path:
    """The embeddings whose scores the ranker trains on under the split ``days``: D's served
    ones, or, when the served towers are refitted on the whole window, those of the towers that
    never saw its days."""
    return ctx.ranker_embeddings if days.refit else ctx.embeddings


def _towers_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from pipelines.towers import run_towers

    if _training_days(ctx).refit:  # the ranker's towers first: the served ones end the stage
        run_towers(ctx.settings, ctx.features, ctx.ranker_towers, served=False, progress=False)
    folder = run_towers(ctx.settings, ctx.features, ctx.towers, progress=False)
    manifest = read_manifest(folder)
    history = manifest.get("metrics", {}).get("history", {})
    metrics = {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float)}
    return Outcome(
        folder,
        note=f"{manifest.get('counts', {}).get('examples', 0):,} clicks, dim {manifest.get('dim')}",
        metrics={**numeric(manifest.get("counts", {})), **metrics},
        curves={f"train.{k}": list(v) for k, v in history.items()},
        artifacts=[("towers", folder / MANIFEST)],
    )


def _embed_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from pipelines.embed import run_embed

    if _training_days(ctx).refit:  # the ranker's inputs first: the served vectors end the stage
        run_embed(
            ctx.settings,
            features=ctx.features,
            towers=ctx.ranker_towers,
            out=ctx.ranker_embeddings,
            upstream={
                "features": upstream["features"],
                "towers": _manifest(ctx.ranker_towers, "embed", "ranker towers"),
            },
            spark=ctx.spark(),
        )
    folder = run_embed(
        ctx.settings,
        features=ctx.features,
        towers=ctx.towers,
        out=ctx.embeddings,
        upstream=upstream,
        spark=ctx.spark(),
    )
    counts = read_manifest(folder).get("counts", {})
    return Outcome(
        folder,
        note=", ".join(f"{v:,} {k}" for k, v in counts.items() if isinstance(v, int)),
        metrics=numeric(counts),
        artifacts=[("embeddings", folder / MANIFEST)],
    )


def _index_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from pipelines.build_index import run_index

    folder = run_index(
        ctx.settings, ctx.date, embeddings=ctx.embeddings, features=ctx.features, out=ctx.index
    )
    manifest = read_manifest(folder)
    metrics = numeric(manifest.get("counts", {}))
    for key in ("ann_recall_at_k", "search_k", "n_trees", "recall_k"):
        if isinstance(manifest.get(key), int | float):
            metrics[key] = float(manifest[key])
    return Outcome(
        folder,
        note=f"ANN recall@{manifest.get('recall_k')} {manifest.get('ann_recall_at_k', 0):.3f}",
        metrics=metrics,
        artifacts=[("index", folder / MANIFEST)],
    )


def _ranker_inputs(ctx: DayContext) -> dict[str, Any]:
    found = {"features": _manifest(ctx.features, "ranker", "features")}
    if ctx.settings.lifecycle.ranker_similarity:
        folder = similarity_embeddings(ctx, _training_days(ctx))
        found["embeddings"] = _manifest(folder, "ranker", "embeddings")
    return found


def _ranker_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from candidates.store import read_embeddings
    from models.feature_spec import load_feature_spec
    from models.ranker.export import export_ranker
    from models.ranker.similarity import EmbeddingSimilarity
    from models.ranker.train import on_served_scores, train_ranker
    from pipelines.towers import training_days

    settings = ctx.settings
    spec = load_feature_spec(ctx.features)
    days = training_days(settings, spec.train_dates)
    similarity = (
        EmbeddingSimilarity(read_embeddings(similarity_embeddings(ctx, days)))
        if days.similarity
        else None
    )
    trained = train_ranker(
        spec, settings.ranker, similarity=similarity, progress=False, dates=days.ranker
    )
    if days.refit and similarity is not None:  # D and serving read the refitted towers' scores
        served = EmbeddingSimilarity(read_embeddings(ctx.embeddings))
        trained = on_served_scores(trained, served)
    # Not moving <model>/CURRENT: a challenger is not served until it is promoted.
    folder = export_ranker(
        trained,
        layout.model_repository(settings.root),
        settings.predictor.model_name,
        ctx.version,
        {"history": trained.history, "training_days": days.describe()},
        update_current=False,
    )
    metrics = dict(trained.metrics)
    return Outcome(
        folder,
        RANKER_MANIFEST,
        note=f"held-out AUC {metrics.get('holdout_auc', float('nan')):.4f}"
        + (" (the network's; the window FM also fits those rows)" if "fm_rows" in metrics else ""),
        metrics=metrics,
        curves={f"train.{k}": list(v) for k, v in trained.history.items()},
        artifacts=[("ranker", folder / RANKER_MANIFEST)],
    )


# --------------------------------------------------------------------------- evaluation


def recall_on_day(
    settings: Settings,
    eval_rows: pd.DataFrame,
    embeddings: Path,
    index: Path,
    ks: list[int],
) -> pd.DataFrame:
    """Recall@K of D's clicked ads through the serving path of one (embeddings, index) pair,
    click by click.

    The gate's retrieval number, measured the same way for the challenger and for the champion
    (whose embeddings come from another features version, which ``evaluate_retrieval`` rightly
    refuses to pair): the same seeded sample of clicks, the candidates serving would return —
    ANNOY alone (``two_tower_ann``) or with the popular quota (``two_tower_popular``).

    Returns:
        One row per sampled click: ``user_id``, ``placement_id``, ``ad_id`` and per K
        ``recall_at_<K>`` (1.0 when the clicked ad is among the first K candidates, else 0.0),
        so that two pairs measured on the same clicks compare click by click
        (:func:`paired_differences`).
    """
    from candidates.service import CandidateService
    from models.evaluation.retrieval import recall_per_query
    from models.evaluation.retrieval_report import RetrievalEvalConfig, sample_clicks
    from pipelines.retrieval_eval import service_candidates

    cfg = settings.lifecycle
    quota = 0.0 if cfg.gate_recall_method == "two_tower_ann" else settings.index.popular_quota
    queries = sample_clicks(eval_rows, cfg.recall_queries, RetrievalEvalConfig().seed)
    if queries.empty:
        raise ValueError("the evaluation day has no clicks: recall@K is undefined")
    service = CandidateService.load(index, embeddings, popular_quota=quota)
    try:
        retrieved = service_candidates(
            service,
            queries["user_id"].astype(str).tolist(),
            queries["placement_id"].astype(str).tolist(),
            sorted(ks),
        )
    finally:
        service.index.close()
    clicked = queries["ad_id"].astype(str).to_numpy()
    hits = queries[["user_id", "placement_id", "ad_id"]].astype(str).reset_index(drop=True)
    for k in sorted(ks):
        hits[recall_metric(k)] = recall_per_query(retrieved[k], clicked, [k])[k]
    return hits


def evaluate_model(
    settings: Settings,
    date: dt.date,
    *,
    ranker: Path,
    features: Path,
    embeddings: Path | None,
    out: Path,
    truth_dir: Path | None,
    peers: Any | None = None,
    back_test: bool = False,
) -> Any:
    """The ranking report of one exported ranker on D's evaluation rows — the one function the
    daily run's evaluate stage and ``deepclick evaluate`` both call, so the same model on the
    same day gets the same numbers and the same seeded intervals (``lifecycle.eval_bootstrap``
    resamples). Truth (generated data) gives the oracle AUC; ``peers`` are scored beside it."""
    import pandas as pd

    from candidates.store import read_embeddings
    from models.evaluation.report import evaluate_ranking
    from models.ranker.similarity import EmbeddingSimilarity

    truth = None
    if truth_dir is not None and (truth_dir / f"{date.isoformat()}.parquet").is_file():
        truth = pd.read_parquet(truth_dir / f"{date.isoformat()}.parquet")
    return evaluate_ranking(
        ranker,
        features,
        out,
        similarity=None if embeddings is None else EmbeddingSimilarity(read_embeddings(embeddings)),
        truth=truth,
        bootstrap=settings.lifecycle.eval_bootstrap,
        allow_version_mismatch=back_test,
        baselines=None if peers is None else {n: p.predict for n, p in peers.models.items()},
    )


def measure(
    ctx: DayContext,
    *,
    embeddings: Path,
    index: Path,
    ranker: Path,
    out: Path,
    back_test: bool,
    peers: Any | None = None,
) -> dict[str, float]:
    """The numbers the gate compares for one (embeddings + index, ranker) pair, all measured on
    D's evaluation set (``features/<D>/eval``): ranking AUC with its interval, logloss,
    normalized entropy and calibration ratio with the interval from D's click count (report, ROC
    and reliability plots written to ``out/ranking``), recall@K of the clicked ads with its
    binomial interval, and the index's measured ANN recall. ``back_test`` scores a model built
    for an earlier day (the champion) on D's rows, pairing it with its own embeddings. ``peers``
    (``models.evaluation.peers.Peers``) are scored on the same rows, and the best one's AUC and
    the paired interval of the ranker's difference to it join the summary."""
    import pandas as pd

    from models.evaluation.ranking import proportion_interval

    cfg = ctx.settings.lifecycle
    report = evaluate_model(
        ctx.settings,
        ctx.date,
        ranker=ranker,
        features=ctx.features,
        embeddings=embeddings,
        out=out / "ranking",
        truth_dir=ctx.truth_dir(),
        peers=peers,
        back_test=back_test,
    )
    ranked = report.metrics["models"]["ranker"]
    summary = {
        key: float(ranked[key])
        for key in ("auc", "logloss", "normalized_entropy", "calibration_ratio", "predicted_ctr")
        if isinstance(ranked.get(key), int | float)
    }
    for key, interval in (("auc", "auc_ci95"), ("calibration", "calibration_ci95")):
        if ranked.get(interval):
            summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = map(float, ranked[interval])
    for name, peer in report.metrics["models"].items():
        if name != "ranker":
            summary[f"peer_{name}_auc"] = float(peer["auc"])
            summary[f"peer_{name}_calibration_ratio"] = float(peer["calibration_ratio"])
    best = report.metrics.get("best_peer")
    if best:
        summary["best_peer_auc"] = float(best["auc"])
        summary["auc_vs_best_peer"] = float(best["auc_difference"])
        summary["auc_vs_best_peer_ci_low"], summary["auc_vs_best_peer_ci_high"] = map(
            float, best["auc_difference_ci95"]
        )
    summary["eval_rows"] = float(report.metrics["evaluation_set"]["rows"])
    summary["eval_clicks"] = float(report.metrics["evaluation_set"]["clicks"])
    summary["observed_ctr"] = float(report.metrics["evaluation_set"]["ctr"])
    if "oracle" in report.metrics:
        summary["oracle_auc"] = float(report.metrics["oracle"]["auc"])
    rows = pd.read_parquet(ctx.features / "eval", columns=EVAL_COLUMNS)
    hits = recall_on_day(ctx.settings, rows, embeddings, index, cfg.recall_ks)
    hits.to_parquet(out / RECALL_HITS_FILE, index=False)
    for k in sorted(cfg.recall_ks):
        name = recall_metric(k)
        summary[name] = float(hits[name].mean())
        low, high = proportion_interval(int(hits[name].sum()), len(hits))
        summary[f"{name}_ci_low"], summary[f"{name}_ci_high"] = low, high
    ann = read_manifest(index).get("ann_recall_at_k")
    if isinstance(ann, int | float):
        summary["ann_recall"] = float(ann)
    return summary


def fit_day_peers(settings: Settings, features: Path) -> Any | None:
    """The peers of ``lifecycle.peers`` fitted on the features folder's training rows, or None
    (no peers configured, or training rows they cannot learn from — said in the log)."""
    from models.evaluation.peers import PeerError, fit_peers, read_training_rows
    from models.feature_spec import load_feature_spec

    cfg = settings.lifecycle
    if not cfg.peers:
        return None
    spec = load_feature_spec(features)
    try:
        rows = read_training_rows(spec, cfg.peer_max_rows, seed=settings.ranker.seed)
        return fit_peers(spec, rows, names=cfg.peers, seed=settings.ranker.seed)
    except PeerError as exc:
        log.warning("no peers on %s: %s", spec.version, exc)
        return None


def replay_challenger(ctx: DayContext, out: Path, peers: Any | None) -> dict[str, Any]:
    """Combine D's challenger into a release that is never served (``<root>/challengers/<D>``)
    and replay D's requests through it (``lifecycle/replay.py``): against the truth on generated
    data, the funnel recall elsewhere. The section is appended to ``ranking/report.md``."""
    from lifecycle.release_writer import publish_release
    from lifecycle.replay import render_funnel_markdown, replay_day
    from models.evaluation.replay import render_replay_markdown

    settings = ctx.settings
    folder = publish_release(
        settings,
        ctx.features,
        ctx.embeddings,
        ctx.index,
        ctx.ranker,
        version=ctx.version,
        update_current=False,
        parent=challengers_dir(settings.root),
    )
    report = replay_day(
        settings,
        ctx.date,
        release_folder=folder,
        features_folder=ctx.features,
        truth_dir=ctx.truth_dir() if settings.lifecycle.replay_requests else None,
        out=out / "replay",
        peers=peers,
    )
    markdown = out / "ranking" / "report.md"
    if markdown.is_file():
        section = render_replay_markdown(report) if report["systems"] else ""
        section += "\n" + render_funnel_markdown(report["funnel_recall"])
        section += "\n![Replay](../replay/replay.png)\n" if report["systems"] else ""
        markdown.write_text(markdown.read_text() + "\n" + section, encoding="utf-8")
    return report


def _evaluate_inputs(ctx: DayContext) -> dict[str, Any]:
    return {
        "ranker": _manifest(ctx.ranker, "evaluate", "ranker", RANKER_MANIFEST),
        "features": _manifest(ctx.features, "evaluate", "features"),
        "embeddings": _manifest(ctx.embeddings, "evaluate", "embeddings"),
        "index": _manifest(ctx.index, "evaluate", "index"),
    }


def _evaluate_config(ctx: DayContext) -> dict[str, Any]:
    cfg = ctx.settings.lifecycle
    return {
        "recall_ks": cfg.recall_ks,
        "recall_queries": cfg.recall_queries,
        "gate_recall_method": cfg.gate_recall_method,
        "eval_bootstrap": cfg.eval_bootstrap,
        "retrieval_als": cfg.retrieval_als,
        "popular_quota": ctx.settings.index.popular_quota,
        "peers": cfg.peers,
        "peer_max_rows": cfg.peer_max_rows,
        "replay_requests": cfg.replay_requests,
        "replay_all_ads": cfg.replay_all_ads,
        "default_candidates": ctx.settings.serving.default_candidates,
    }


def _evaluate_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    from models.evaluation.retrieval_report import RetrievalEvalConfig
    from pipelines.retrieval_eval import evaluate_retrieval

    cfg = ctx.settings.lifecycle
    parent = ctx.evaluation.parent
    ks = tuple(sorted(cfg.recall_ks))
    peers = fit_day_peers(ctx.settings, ctx.features)
    with publishing(parent, ctx.version, update_current=False) as staging:
        summary = measure(
            ctx,
            embeddings=ctx.embeddings,
            index=ctx.index,
            ranker=ctx.ranker,
            out=staging.path,
            back_test=False,
            peers=peers,
        )
        replayed = replay_challenger(ctx, staging.path, peers)
        summary.update(replayed["summary"])
        retrieval = evaluate_retrieval(
            ctx.settings,
            ctx.date,
            embeddings_folder=ctx.embeddings,
            index_folder=ctx.index,
            features_folder=ctx.features,
            spark=ctx.spark_session,
            truth_dir=ctx.truth_dir(),
            out_dir=staging.path / "retrieval",
            config=RetrievalEvalConfig(
                ks=ks,
                max_queries=cfg.recall_queries,
                target_k=500 if 500 in ks else ks[-1],
            ),
            run_als=cfg.retrieval_als,
        )
        (staging.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        versions = {k: v.get("version") for k, v in upstream.items()}
        staging.manifest.update(
            {
                "stage": "evaluate",
                "target_date": ctx.date.isoformat(),
                "inputs": versions,
                "metrics": summary,
                "retrieval": {
                    "recall_at_k": retrieval.get("recall_at_k", {}),
                    "target": retrieval.get("target"),
                },
            }
        )
    extra = numeric(retrieval.get("recall_at_k", {}), "retrieval.")
    return Outcome(
        ctx.evaluation,
        note=evaluation_note(summary, cfg.gate_recall_k),
        metrics={**summary, **extra},
        artifacts=[("evaluation", ctx.evaluation)],
    )


def evaluation_note(summary: dict[str, float], recall_k: int) -> str:
    """The evaluate stage's line on the console: AUC against the best peer, calibration with
    its interval, recall@K and, on generated data, the replay's top-10 slate."""
    nan = float("nan")
    text = f"AUC {summary.get('auc', nan):.4f}"
    if "best_peer_auc" in summary:
        text += f" (best peer {summary['best_peer_auc']:.4f})"
    text += f", calibration {summary.get('calibration_ratio', nan):.3f}"
    if "calibration_ci_low" in summary:
        text += f" [{summary['calibration_ci_low']:.2f}–{summary['calibration_ci_high']:.2f}]"
    text += f", recall@{recall_k} {summary.get(recall_metric(recall_k), nan):.3f}"
    if "deepclick_top10_share_of_oracle" in summary:
        text += (
            f", replay top-10 {summary['deepclick_top10_share_of_oracle']:.2f} of oracle, "
            f"{summary.get('deepclick_top10_x_popularity', nan):.2f}× popularity"
        )
    return text


# --------------------------------------------------------------------------- gate and publish


def components(ctx: DayContext) -> dict[str, dict[str, Any]]:
    """D's published parts as a decision records them: version, folder (relative to root),
    manifest digest — which later proves the folder was not republished — and MLflow version."""
    root = ctx.settings.root
    parts = {
        "features": (ctx.features, MANIFEST),
        "towers": (ctx.towers, MANIFEST),
        "embeddings": (ctx.embeddings, MANIFEST),
        "index": (ctx.index, MANIFEST),
        "ranker": (ctx.ranker, RANKER_MANIFEST),
    }
    found: dict[str, dict[str, Any]] = {}
    for name, (folder, manifest_name) in parts.items():
        manifest = _manifest(folder, "publish", name, manifest_name)
        found[name] = {
            "version": str(manifest.get("version")),
            "folder": relative(folder, root),
            "manifest": manifest_name,
            "manifest_sha256": sha256_file(folder / manifest_name),
        }
    for kind in ("towers", "ranker"):
        found[kind]["registered_version"] = ctx.registered.get(kind)
    return found


def _champion_folder(settings: Settings, champion: dict[str, Any], name: str) -> Path:
    """A component folder of the champion, checked to be the very one that was promoted."""
    part = champion["challenger"][name]
    folder = Path(part["folder"])
    folder = folder if folder.is_absolute() else settings.root / folder
    path = folder / part.get("manifest", MANIFEST)
    if not path.is_file() or sha256_file(path) != part["manifest_sha256"]:
        raise ChampionUnavailableError(
            f"the champion (built for {champion['date']}) cannot be re-measured: its {name} "
            f"folder {folder} is missing or was republished since it was promoted"
        )
    return folder


def _gate_config(ctx: DayContext) -> dict[str, Any]:
    return {
        k: v
        for k, v in ctx.settings.lifecycle.model_dump(mode="json").items()
        if k.startswith("gate_")
    }


def paired_differences(
    challenger: Path, champion: Path, *, samples: int, recall_ks: Sequence[int]
) -> dict[str, float]:
    """The champion summary's paired entries (:data:`lifecycle.gate.PAIRED`): challenger −
    champion on the same rows of D, each with a paired bootstrap interval.

    - ``auc_paired_difference``: both rankers' AUC on each resample of D's rows, from the
      per-row predictions in the two ranking report folders (``ranking/predictions.parquet``);
    - ``recall_at_<K>_paired_difference``: the mean difference of the two candidate sources'
      per-click recall on the same sampled clicks (:data:`RECALL_HITS_FILE`). Clicks both find
      or both miss move nothing, so the interval rests on the clicks where they disagree
      (McNemar's discordant pairs) instead of two binomial intervals taken as independent.

    An entry is left out — the gate then takes the two intervals as independent — without
    resamples, when a file is missing (an evaluation published before these files existed), or
    when the two do not hold the same rows or clicks.
    """
    import pandas as pd

    from models.evaluation.ranking import auc_difference_interval, paired_mean_difference
    from models.evaluation.report import PREDICTIONS_FILE

    found: dict[str, float] = {}
    if samples <= 0:
        return found

    def entry(name: str, interval: tuple[float, float, float]) -> None:
        key = f"{name}_{PAIRED}"
        found[key], found[f"{key}_ci_low"], found[f"{key}_ci_high"] = interval

    mine = challenger / "ranking" / PREDICTIONS_FILE
    theirs = champion / "ranking" / PREDICTIONS_FILE
    if mine.is_file() and theirs.is_file():
        a, b = pd.read_parquet(mine), pd.read_parquet(theirs)
        if len(a) == len(b) and a["label"].equals(b["label"]):
            entry(
                "auc",
                auc_difference_interval(a["label"], a["ranker"], b["ranker"], samples=samples),
            )
        else:
            log.warning("gate: %s and %s hold different rows: no paired AUC interval", mine, theirs)
    mine, theirs = challenger / RECALL_HITS_FILE, champion / RECALL_HITS_FILE
    if mine.is_file() and theirs.is_file():
        a, b = pd.read_parquet(mine), pd.read_parquet(theirs)
        clicks = ["user_id", "placement_id", "ad_id"]
        if len(a) == len(b) and a[clicks].equals(b[clicks]):
            for k in recall_ks:
                name = recall_metric(k)
                if name in a and name in b:
                    entry(name, paired_mean_difference(a[name], b[name], samples=samples))
        else:
            log.warning("gate: %s and %s hold different clicks: no paired recall", mine, theirs)
    return found


def _gate_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    settings = ctx.settings
    evaluation = upstream["evaluation"]
    challenger = dict(evaluation.get("metrics", {}))
    champion = current_champion(settings)
    with publishing(ctx.gate.parent, ctx.version, update_current=False) as staging:
        champion_metrics: dict[str, Any] | None = None
        basis = champion_basis(champion, ctx.date)
        if basis == SAME_DAY:
            champion_metrics = recorded_champion_metrics(champion)
        elif basis == EARLIER_CHAMPION:
            champion_metrics = measure(
                ctx,
                embeddings=_champion_folder(settings, champion, "embeddings"),
                index=_champion_folder(settings, champion, "index"),
                ranker=_champion_folder(settings, champion, "ranker"),
                out=staging.path / "champion",
                back_test=True,
            )
            champion_metrics.update(
                paired_differences(
                    ctx.evaluation,
                    staging.path / "champion",
                    samples=settings.lifecycle.eval_bootstrap,
                    recall_ks=settings.lifecycle.recall_ks,
                )
            )
        result = decide(ctx.date, challenger, champion, champion_metrics, settings.lifecycle)
        decision = {
            "date": ctx.date.isoformat(),
            **result.to_dict(),
            "metrics": {"challenger": challenger, "champion": champion_metrics},
            "champion": None
            if champion is None
            else {
                "decision_id": champion["id"],
                "date": champion["date"],
                "release": champion.get("release"),
                "ranker": champion["challenger"]["ranker"]["version"],
            },
        }
        (staging.path / DECISION_FILE).write_text(json.dumps(decision, indent=2) + "\n")
        staging.manifest.update(
            {
                "stage": "gate",
                "inputs": {"evaluation": evaluation.get("version")},
                "promote": result.promote,
                "metrics": numeric({"champion": champion_metrics or {}}),
            }
        )
    metrics = {"promote": float(result.promote), **numeric({"champion": champion_metrics or {}})}
    return Outcome(
        ctx.gate,
        note=("pass: " if result.verdict == "promote" else "") + result.reason,
        metrics=metrics,
        artifacts=[("gate", ctx.gate)],
        extra={"promote": result.promote},
    )


def _publish_run(ctx: DayContext, upstream: Upstream) -> Outcome:
    settings = ctx.settings
    gate = json.loads((ctx.gate / DECISION_FILE).read_text())
    parts = components(ctx)
    record: dict[str, Any] = {
        "date": ctx.date.isoformat(),
        "dataset": ctx.spec().name,
        "reason": gate["reason"],
        "checks": gate["checks"],
        "metrics": gate["metrics"],
        "challenger": parts,
        "champion_before": gate.get("champion"),
        "gate": relative(ctx.gate, settings.root),
    }
    if not gate["promote"]:
        entry = append_decision(settings, {**record, "action": REFUSED, "release": None})
        return Outcome(
            None,
            note=f"refused; serving unchanged ({gate['reason']})",
            metrics={"promoted": 0.0},
            decision=entry,
            extra={"decision_id": entry["id"], "action": REFUSED},
        )
    from lifecycle.release_writer import publish_release
    from lifecycle.tfserving_repository import (
        live_ranker_version,
        publish_champion,
        tfserving_repository,
    )

    publish_champion(  # first, so TF Serving loads it while the old release still answers
        ctx.ranker,
        tfserving_repository(settings) / settings.predictor.model_name,
        RANKER_MANIFEST,
        serving=live_ranker_version(settings.root),
    )
    release = publish_release(settings, ctx.features, ctx.embeddings, ctx.index, ctx.ranker)
    set_current(ctx.ranker.parent, ctx.version)  # TF Serving / in-process pointer of the champion
    entry = append_decision(settings, {**record, "action": PROMOTED, "release": release.name})
    return Outcome(
        release,
        note=f"promoted: release {release.name} serves",
        metrics={"promoted": 1.0},
        artifacts=[("release", release / RELEASE_FILE)],
        decision=entry,
        extra={"decision_id": entry["id"], "action": PROMOTED},
    )


def _decision_recorded(ctx: DayContext, entry: dict[str, Any]) -> str | None:
    decision_id = entry.get("extra", {}).get("decision_id")
    if decision_id and find_decision(ctx.settings, decision_id) is not None:
        return None
    return f"decision {decision_id} is not in the decisions ledger"


def _upstream(stage: str, *names: str) -> Callable[[DayContext], Upstream]:
    """``inputs`` of a stage that reads the manifests of D's folders ``names``."""
    manifests = {"ranker": RANKER_MANIFEST}

    def inputs(ctx: DayContext) -> Upstream:
        return {
            name: _manifest(getattr(ctx, name), stage, name, manifests.get(name, MANIFEST))
            for name in names
        }

    return inputs


def _training_days_config(ctx: DayContext) -> dict[str, Any]:
    """What decides the towers' and the ranker's days (pipelines/training_days.py)."""
    cfg = ctx.settings.lifecycle
    return {
        "similarity": cfg.ranker_similarity,
        "ranker_days": cfg.ranker_days,
        "refit_towers": cfg.refit_towers,
    }


def _section(name: str) -> Callable[[DayContext], dict[str, Any]]:
    return lambda ctx: getattr(ctx.settings, name).model_dump(mode="json")


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        _ingest_run,
        _ingest_inputs,
        lambda ctx: {},
        uses_spark=True,
        protects=("features", "embeddings", "index", "ranker"),
        adopt=_ingest_adopt,
    ),
    Stage(
        "features",
        _features_run,
        _features_inputs,
        _section("features"),
        uses_spark=True,
        protects=("features", "embeddings", "index", "ranker"),
    ),
    Stage(
        "towers",
        _towers_run,
        _upstream("towers", "features"),
        lambda ctx: {
            **ctx.settings.two_tower.model_dump(mode="json"),
            **_training_days_config(ctx),
        },
        registers="towers",
        protects=("embeddings", "index", "ranker"),
    ),
    Stage(
        "embed",
        _embed_run,
        _upstream("embed", "features", "towers"),
        lambda ctx: {},
        uses_spark=True,
        protects=("embeddings", "index", "ranker"),
    ),
    Stage(
        "index",
        _index_run,
        _upstream("index", "embeddings", "features"),
        _section("index"),
        protects=("index",),
    ),
    Stage(
        "ranker",
        _ranker_run,
        _ranker_inputs,
        lambda ctx: {
            "ranker": ctx.settings.ranker.model_dump(mode="json"),
            **_training_days_config(ctx),
            "model_name": ctx.settings.predictor.model_name,
        },
        registers="ranker",
        protects=("ranker",),
    ),
    Stage("evaluate", _evaluate_run, _evaluate_inputs, _evaluate_config),
    Stage("gate", _gate_run, _upstream("gate", "evaluation"), _gate_config),
    Stage(
        "publish",
        _publish_run,
        _upstream("publish", "gate"),
        lambda ctx: {"timezone": ctx.settings.serving.timezone},
        still_valid=_decision_recorded,
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
SPARK_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.uses_spark)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
