"""``deepclick demo`` / ``make demo``: the whole system on freshly generated data.

It generates a few days of marketplace logs, runs the daily pipeline for the last two days (ingest →
features → towers → embed → index → ranker → evaluate → gate → publish; earlier days are ingested
on the way, the second day shows a promotion decision against the first day's champion), starts the
ranking API on loopback with the published release, sends a few requests and prints the ranked
ads, then says where the reports, plots and the MLflow store are.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from deepclick import layout
from deepclick.publish import current_version
from deepclick.settings import Settings
from lifecycle.daily import run_daily
from lifecycle.registry import decisions_path
from pipelines.simulate import run_simulate
from pipelines.spark import get_spark


def run_demo(
    settings: Settings, *, days: int, impressions_per_day: int, console: Console
) -> dict[str, Any]:
    """Run the system end to end; return the daily reports and the API's answers."""
    if days < 3:
        raise ValueError("the demo needs at least 3 days: training days, then two daily runs")
    sim = settings.simulate.model_copy(
        update={"days": days, "impressions_per_day": impressions_per_day}
    )
    raw = layout.raw_dir(settings.root) / "marketplace"
    console.rule(f"simulate {days} days × {impressions_per_day:,} impressions → {raw}")
    summary = run_simulate(sim, raw)
    _table(
        console,
        "simulated days (oracle AUC = the ceiling any ranker can reach)",
        [d.__dict__ for d in summary.days],
        ["date", "impressions", "clicks", "ctr", "oracle_auc", "new_ads", "new_placements"],
    )
    spark = get_spark(settings.spark)
    console.rule("ingest the training days")
    for day in summary.days[:-2]:
        run_daily(
            settings,
            dt.date.fromisoformat(day.date),
            source=raw,
            spark=spark,
            console=console,
            stages=["ingest"],
        )
    reports = []
    for day in summary.days[-2:]:
        reports.append(
            run_daily(
                settings, dt.date.fromisoformat(day.date), source=raw, spark=spark, console=console
            )
        )
    _table(
        console,
        "promotion decisions",
        [
            {
                "date": r.date,
                "decision": (r.decision or {}).get("action"),
                "release": r.release,
                "seconds": r.seconds,
            }
            for r in reports
        ],
        ["date", "decision", "release", "seconds"],
    )
    _print_quality(settings, summary.days[-1].date, console)
    answers: list[dict[str, Any]] = []
    if current_version(layout.releases_dir(settings.root)) is None:
        console.print(
            "[yellow]no release serves:[/yellow] the gate promoted no challenger (reasons above "
            f"and in {decisions_path(settings)}), so the API is not started"
        )
    else:
        answers = _serve_and_query(settings, summary.days[-1].date, console)
    console.rule("where things are")
    console.print(f"state root:        {settings.root}")
    console.print(
        f"evaluation:        {layout.evaluations_dir(settings.root)}/<YYYYMMDD>/ "
        "(ranking/report.md, roc.png, reliability.png; retrieval/recall_at_k.png; "
        "replay/replay.png)"
    )
    console.print(f"MLflow store:      {settings.mlflow_tracking_uri}")
    console.print(
        f"MLflow UI:         .venv/bin/mlflow ui --backend-store-uri "
        f"{settings.mlflow_tracking_uri} --port 5000"
    )
    console.print(
        f"model repository:  {layout.model_repository(settings.root)} (TF Serving layout)"
    )
    return {"reports": [r.to_dict() for r in reports], "answers": answers}


def _print_quality(settings: Settings, date: str, console: Console) -> None:
    """The last day's evaluation: the ranker beside its peers on the same rows, and the replay
    of the day's requests against the simulator's truth."""
    from pipelines.quality_tables import models_table, replay_tables

    folder = layout.DayLayout(settings.root, layout.parse_date(date)).evaluation
    metrics_file = folder / "ranking" / "metrics.json"
    if not metrics_file.is_file():
        console.print(f"no evaluation for {date}: the daily run stopped before it")
        return
    console.rule(f"model quality on {date}")
    metrics = json.loads(metrics_file.read_text())
    console.print(models_table(f"ranker and peers on {date} (same rows)", metrics))
    replay_file = folder / "replay" / "replay.json"
    if replay_file.is_file():
        report = json.loads(replay_file.read_text())
        for table in replay_tables(f"replay of {date} against the truth", report):
            console.print(table)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_and_query(settings: Settings, date: str, console: Console) -> list[dict[str, Any]]:
    """Start ``deepclick serve`` on loopback, wait until ready, rank ads for a few users, stop."""
    port = _free_port()
    env = {
        **os.environ,
        "DEEPCLICK_ROOT": str(settings.root),
        "DEEPCLICK_SERVING__HOST": "127.0.0.1",
        "DEEPCLICK_SERVING__PORT": str(port),
    }
    console.rule(f"ranking API on http://127.0.0.1:{port}")
    command = [sys.executable, "-m", "deepclick_cli", "serve", "--workers", "2"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    answers: list[dict[str, Any]] = []
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server)
        users = _sample_users(settings, date)
        with httpx.Client(base_url=base, timeout=10) as client:
            bodies = [
                {"user_id": user_id, "placement_id": placement_id, "num_ads": 5}
                for user_id, placement_id in users
            ]
            bodies.append({"user_id": "new-visitor", "placement_id": users[0][1], "num_ads": 5})
            for body in bodies:
                answer = rank_when_ready(client, body)
                answers.append(answer)
                _print_answer(console, body, answer)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return answers


def rank_when_ready(
    client: httpx.Client, body: dict[str, Any], *, timeout_s: float = 60.0
) -> dict[str, Any]:
    """``POST /v1/rank`` with ``body``; while the answer is 503 (the worker behind this
    connection has no release yet, or is overloaded), wait its ``Retry-After`` and ask again,
    up to ``timeout_s``. Each server worker loads the release on its own, so ``/readyz`` answered
    by one worker says nothing about the one a keep-alive connection reaches. Returns the
    answer, or ``{"error": "HTTP <status>: <detail>"}`` when there is none."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.post("/v1/rank", json=body)
        if response.status_code != 503:
            break
        pause = float(response.headers.get("Retry-After", "1"))
        if time.monotonic() + pause > deadline:
            break
        time.sleep(pause)
    if response.status_code == 200:
        return response.json()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return {"error": f"HTTP {response.status_code}: {detail}"}


def _wait_ready(base: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the API exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the API at {base} was not ready within {timeout:.0f} s")


def _sample_users(settings: Settings, date: str) -> list[tuple[str, str]]:
    """A few (user, placement) pairs that clicked on the evaluation day."""
    import pyarrow.parquet as pq

    folder = layout.DayLayout(settings.root, layout.parse_date(date)).eval_rows
    table = pq.read_table(folder, columns=["user_id", "placement_id", "label"]).to_pandas()
    clicked = table[table.label == 1].drop_duplicates("user_id").head(3)
    return list(zip(clicked.user_id, clicked.placement_id, strict=True))


def _print_answer(console: Console, body: dict[str, Any], answer: dict[str, Any]) -> None:
    if "error" in answer:
        console.print(f"user {body['user_id']} on {body['placement_id']}: [red]{answer['error']}")
        return
    title = (
        f"user {body['user_id']} on {body['placement_id']}: "
        f"{answer.get('candidates_considered')} candidates, "
        f"fallbacks {answer.get('fallbacks')}, degraded {answer.get('degraded')}"
    )
    rows = [{"rank": i + 1, **ad} for i, ad in enumerate(answer.get("ads", []))]
    _table(console, title, rows, ["rank", "ad_id", "pctr", "score"])
    timings = answer.get("timings_ms") or answer.get("timings")
    if timings:
        console.print(f"  stage timings (ms): {json.dumps(timings)}")


def _table(console: Console, title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)
