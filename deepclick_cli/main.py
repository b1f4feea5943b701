"""The ``deepclick`` command line: one sub-command per stage of DESIGN.md's flow.

Settings are loaded once here (``--config`` / ``DEEPCLICK_CONFIG`` / ``DEEPCLICK_*``) and handed to
the stage runners; heavy imports (Spark, TensorFlow) happen inside the command that needs them, so
``deepclick --help`` stays fast.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from deepclick import layout
from deepclick.errors import DeepclickError
from deepclick.settings import Settings, SettingsError, load_settings

console = Console()


class _Commands(TyperGroup):
    """Every command runs through here: a :class:`DeepclickError` (whose message names the rule
    broken and the fix) or an :class:`OSError` (a missing path, a full disk, a permission: the
    machine, not the code) is printed and exits 1; any other exception is a bug and keeps its
    traceback. The one place the CLI catches errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DeepclickError, OSError) as exc:
            console.print(f"[red]error:[/red] {exc}", soft_wrap=True)  # one line, whole
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    name="deepclick",
    help="Ad click prediction: Spark pipelines, two-tower candidates, a TF Serving CTR ranker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="settings YAML (default: $DEEPCLICK_CONFIG, else defaults)"
    ),
]
DateOption = Annotated[str, typer.Option("--date", "-d", help="day to process, YYYY-MM-DD")]
_invocation: dict[str, Any] = {"verbose": False, "ctx": None}
"""The current command line's ``--verbose`` and context (set by :func:`_options`)."""


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="show library output (TensorFlow, Spark, warnings) on the console instead of "
            "the log file under <root>/logs",
        ),
    ] = False,
) -> None:
    """Ad click prediction: Spark pipelines, two-tower candidates, a TF Serving CTR ranker."""
    _invocation.update(verbose=verbose, ctx=ctx)
    ctx.call_on_close(lambda: _invocation.update(ctx=None))


def _quiet_libraries(settings: Settings) -> None:
    """Library banners and progress bars go to a log file (deepclick/library_logs.py); the
    stage table, warnings that need a person and errors stay here. Undone when the command
    ends."""
    ctx = _invocation["ctx"]
    if _invocation["verbose"] or ctx is None or ctx.meta.get("deepclick.library_logs"):
        return
    if ctx.invoked_subcommand == "serve":  # the server's access and error logs stay on the console
        return
    from deepclick.library_logs import route_library_output

    routed = route_library_output(settings.root)
    ctx.meta["deepclick.library_logs"] = routed
    ctx.call_on_close(routed.restore)
    console.print(f"[dim]library output (TensorFlow, Spark): {routed.path}[/dim]", soft_wrap=True)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config, **overrides)
    except SettingsError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _quiet_libraries(settings)
    return settings


def _date(value: str, option: str = "--date") -> dt.date:
    try:
        return layout.parse_date(value)
    except ValueError:
        console.print(f"[red]error:[/red] {option} {value!r} is not a date (YYYY-MM-DD)")
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


def print_counts(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows.items():
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, shown)
    console.print(table)


@app.command()
def simulate(
    config: ConfigOption = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: <root>/raw/marketplace)")
    ] = None,
    days: Annotated[int | None, typer.Option(help="number of days")] = None,
    impressions_per_day: Annotated[int | None, typer.Option(help="impressions per day")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
) -> None:
    """Generate marketplace logs with known ground truth (one folder per day)."""
    settings = _settings(config)
    changes = {"days": days, "impressions_per_day": impressions_per_day, "seed": seed}
    sim = settings.simulate.model_copy(update={k: v for k, v in changes.items() if v is not None})
    from pipelines.simulate import run_simulate

    summary = run_simulate(sim, out or layout.raw_source(settings.root, "marketplace"))
    print_counts("simulate", summary.as_rows())


@app.command()
def ingest(
    dataset: Annotated[str, typer.Option(help="built-in spec name or path to a spec YAML")],
    source: Annotated[Path, typer.Option(help="folder (or file) holding the raw logs")],
    date: DateOption,
    until: Annotated[str | None, typer.Option(help="last day of a range (inclusive)")] = None,
    config: ConfigOption = None,
) -> None:
    """Validate raw logs and publish canonical events, quarantine and side snapshots."""
    settings = _settings(config)
    from pipelines.ingest.runner import run_ingest
    from pipelines.specs import load_spec

    spec = load_spec(dataset)
    end = _date(until, "--until") if until else None
    report = run_ingest(settings, spec, source, _date(date), end)
    print_ingest_report(report)


def print_ingest_report(report: Any) -> None:
    print_counts(
        f"ingest {report.dataset} {report.start}..{report.end}",
        {
            "rows in": report.rows_in,
            "written": report.rows_written,
            "quarantined": report.rows_quarantined,
            "duplicates dropped": report.duplicates_dropped,
            "other dates": sum(report.rows_other_dates.values()),
        },
    )
    if report.rows_other_dates:
        console.print(f"rows of other dates (not ingested): {report.rows_other_dates}")
    if report.missing_dates:
        console.print(f"[yellow]no rows for:[/yellow] {', '.join(report.missing_dates)}")
    for reason, count in report.quarantine_reasons.items():
        console.print(f"  quarantined {count:,}: {reason}")


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="run even a stage whose inputs, settings and code version are unchanged and whose "
        "output verifies (skipped otherwise); the serving guard still applies",
    ),
]


def run_one_stage(
    settings: Settings, day: dt.date, stage: str, *, dataset: str | None = None, force: bool
) -> tuple[Path, dict[str, Any]]:
    """Run one stage of D's daily run through the run's own stage runner
    (:func:`lifecycle.daily.run_stage`): the day's lock, the run ledger entry, the fingerprint
    skip, the tracker and the serving guard are those of ``deepclick run``. Prints what the stage
    did; returns its published folder and manifest."""
    import uuid

    from deepclick.publish import read_manifest
    from lifecycle.daily import run_stage

    run_key = f"cli-{stage}-{layout.version_for(day)}-{uuid.uuid4().hex[:8]}"
    result = run_stage(
        settings, day, stage, run_key=run_key, dataset=dataset, force=force, finish=True
    )
    if result.output is None:  # pragma: no cover - every per-stage command publishes a folder
        raise _fail(f"stage {stage!r} published nothing")
    folder = settings.root / result.output
    shown = "ran" if result.status == "ran" else f"skipped: {result.reason}"
    console.print(f"{stage} {day.isoformat()}: {shown} ({result.seconds:.1f} s)")
    return folder, read_manifest(folder)


def _events_dataset(settings: Settings, day: dt.date) -> str | None:
    """The dataset of D's events (else the warehouse's only one): the features window's
    default, as before the command ran through the stage runner. None without any events."""
    from pipelines.features.runner import choose_dataset, list_partitions

    held = list_partitions(layout.events_dir(settings.root))
    return choose_dataset(held, day, None) if held else None


@app.command()
def features(
    date: DateOption,
    config: ConfigOption = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="dataset whose days form the window (default: the one of D's events)"),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Build vocabularies, entity tables and training/evaluation sets from events before D."""
    settings = _settings(config)
    day = _date(date)
    name = dataset or _events_dataset(settings, day)
    folder, manifest = run_one_stage(settings, day, "features", dataset=name, force=force)
    print_counts(f"features {date} → {folder}", manifest.get("counts", {}))


@app.command()
def towers(date: DateOption, config: ConfigOption = None, force: ForceOption = False) -> None:
    """Train the two-tower model on D's retrieval set and publish its exported towers."""
    settings = _settings(config)
    folder, manifest = run_one_stage(settings, _date(date), "towers", force=force)
    print_counts(f"towers {date} → {folder}", {**manifest["counts"], "dim": manifest["dim"]})


@app.command()
def embed(date: DateOption, config: ConfigOption = None, force: ForceOption = False) -> None:
    """Embed every user, placement and ad with D's towers (Spark) and publish the tables."""
    settings = _settings(config)
    folder, manifest = run_one_stage(settings, _date(date), "embed", force=force)
    print_counts(f"embeddings {date} → {folder}", manifest.get("counts", {}))


@app.command()
def index(date: DateOption, config: ConfigOption = None, force: ForceOption = False) -> None:
    """Build the ANNOY index over D's ad vectors, measure its recall and publish it."""
    settings = _settings(config)
    folder, manifest = run_one_stage(settings, _date(date), "index", force=force)
    print_counts(
        f"index {date} → {folder}",
        {
            **manifest.get("counts", {}),
            "ann_recall_at_k": manifest["ann_recall_at_k"],
            "search_k": manifest["search_k"],
        },
    )


@app.command()
def serve(
    config: ConfigOption = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
) -> None:
    """Serve the ranking API (POST /v1/rank) over the current published release."""
    overrides = {k: v for k, v in {"workers": workers, "port": port}.items() if v is not None}
    settings = _settings(config)
    if overrides:
        settings = settings.model_copy(
            update={"serving": settings.serving.model_copy(update=overrides)}
        )
    from serving.server import run

    run(settings, workers)


@app.command()
def evaluate(
    date: DateOption,
    model_version: Annotated[
        str | None, typer.Option(help="ranker version to judge (default: the one built for D)")
    ] = None,
    peers: Annotated[
        bool, typer.Option(help="fit the peers (LR, GBDT, ad CTR prior) and score them beside it")
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Offline evaluation of any exported ranker version on D's evaluation set — the daily run's
    own evaluation function, so the same model and day give the same numbers and intervals: AUC
    with CI, logloss, NE, calibration with CI, per placement, the peers, oracle AUC on generated
    data. Written to <root>/reports/<YYYYMMDD>/ranker-<version>/ (never into the run's published
    evaluations/ folder)."""
    settings = _settings(config)
    from deepclick.layout import version_for
    from deepclick.publish import resolve
    from lifecycle.stages import DayContext, evaluate_model, fit_day_peers
    from models.ranker.predictor import InProcessPredictor

    day = _date(date)
    version = model_version or version_for(day)
    ctx = DayContext(settings, day, settings.lifecycle.dataset, layout.raw_dir(settings.root))
    folder = layout.model_repository(settings.root) / settings.predictor.model_name / version
    model = InProcessPredictor(folder)
    embeddings = None
    if model.uses_similarity:
        embeddings = resolve(
            layout.embeddings_dir(settings.root), model.embedding_version, what="embeddings"
        )
    out = report_folder(settings, day, version)
    report = evaluate_model(
        settings,
        day,
        ranker=folder,
        features=ctx.features,
        embeddings=embeddings,
        out=out,
        truth_dir=ctx.truth_dir(),
        peers=fit_day_peers(settings, ctx.features) if peers else None,
        back_test=version != version_for(day),
    )
    from pipelines.quality_tables import models_table

    console.print(models_table(f"evaluate ranker {version} on {date} → {out}", report.metrics))


def report_folder(settings: Settings, day: dt.date, version: str) -> Path:
    """Where ``deepclick evaluate`` writes: beside, never inside, the run's published folders."""
    return layout.reports_dir(settings.root, day) / f"ranker-{version}"


@app.command()
def replay(
    date: DateOption,
    release: Annotated[
        Path | None,
        typer.Option(help="release folder (default: D's challenger, else the serving release)"),
    ] = None,
    requests: Annotated[int | None, typer.Option(help="requests of D to replay")] = None,
    config: ConfigOption = None,
) -> None:
    """Replay D's requests through the /v1/rank code path (in process) and value every slate with
    the simulator's truth: oracle, popularity, random, the ranker without its funnel, the LR peer.
    Where no truth exists, the funnel recall of D's clicks. Written to
    <root>/reports/<YYYYMMDD>/replay/."""
    overrides = {} if requests is None else {"lifecycle": {"replay_requests": requests}}
    settings = _settings(config, **overrides)
    from deepclick.layout import DayLayout
    from lifecycle.replay import replay_day
    from lifecycle.stages import DayContext, fit_day_peers
    from serving.release import current_release_folder

    day = _date(date)
    ctx = DayContext(settings, day, settings.lifecycle.dataset, layout.raw_dir(settings.root))
    folder = release
    if folder is None:
        challenger = DayLayout(settings.root, day).challenger_release
        folder = challenger if challenger.is_dir() else current_release_folder(settings.root)
    if folder is None:
        raise _fail("no release to replay: run the daily pipeline for D first")
    out = layout.reports_dir(settings.root, day) / "replay"
    report = replay_day(
        settings,
        day,
        release_folder=folder,
        features_folder=ctx.features,
        truth_dir=ctx.truth_dir(),
        out=out,
        peers=fit_day_peers(settings, ctx.features),
    )
    from pipelines.quality_tables import replay_tables

    for table in replay_tables(f"replay of {date} with release {folder.name} → {out}", report):
        console.print(table)


DatasetOption = Annotated[
    str | None, typer.Option(help="dataset spec (default: lifecycle settings, else marketplace)")
]
SourceOption = Annotated[
    Path | None, typer.Option(help="raw logs: a day folder, or a folder of day folders")
]


@app.command()
def run(
    date: DateOption,
    dataset: DatasetOption = None,
    source: SourceOption = None,
    config: ConfigOption = None,
    force: ForceOption = False,
) -> None:
    """The daily pipeline for D: ingest → features → towers → embed → index → ranker →
    evaluate → gate → publish. Unchanged stages are skipped; a failure leaves serving as it was."""
    settings = _settings(config)
    from lifecycle.daily import run_daily

    run_daily(settings, _date(date), dataset=dataset, source=source, console=console, force=force)


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option(help="last day (inclusive), YYYY-MM-DD")],
    dataset: DatasetOption = None,
    source: SourceOption = None,
    config: ConfigOption = None,
) -> None:
    """Run the daily pipeline for every day from START to END, oldest first."""
    settings = _settings(config)
    from lifecycle.daily import run_backfill

    run_backfill(
        settings,
        _date(start, "--start"),
        _date(end, "--end"),
        dataset=dataset,
        source=source,
        console=console,
    )


@app.command()
def specs(show: Annotated[str | None, typer.Argument(help="spec name or path")] = None) -> None:
    """List the built-in dataset specs, or validate and show one."""
    from pipelines.specs import builtin_specs, load_spec

    if show is None:
        for name in builtin_specs():
            console.print(f"{name}: {load_spec(name).description}")
        return
    spec = load_spec(show)
    console.print_json(spec.model_dump_json())


@app.command()
def demo(
    config: ConfigOption = None,
    days: Annotated[int, typer.Option(help="days to generate")] = 4,
    impressions_per_day: Annotated[int, typer.Option(help="impressions per day")] = 20_000,
) -> None:
    """Run everything that exists end to end on freshly generated data, with a summary."""
    settings = _settings(config)
    from lifecycle.demo import run_demo

    run_demo(settings, days=days, impressions_per_day=impressions_per_day, console=console)


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m deepclick_cli.main`
    main()
