"""Stand-alone stage commands hold what ``deepclick run`` holds (issue 12, item 4): the day's run
lock, and the serving guard that refuses to republish a folder the serving release reads."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deepclick.publish import publishing, sha256_file
from deepclick.settings import Settings
from deepclick_cli.main import app
from lifecycle.daily import RunLedger


def _serving_release_reading(root: Path, index_version: str) -> Path:
    """A published index folder and a served release (CURRENT) that names it."""
    with publishing(root / "artifacts" / "index", index_version) as staging:
        (staging.path / "ads.ann").write_bytes(b"forest")
    release = {"version": index_version, "index": {"folder": f"artifacts/index/{index_version}"}}
    with publishing(root / "releases", index_version) as staging:
        (staging.path / "release.json").write_text(json.dumps(release))
    return root / "artifacts" / "index" / index_version


def _config(tmp_path: Path) -> Path:
    """Settings rooted under ``tmp_path``; MLflow off (these tests are about the lock and the
    guard, and a per-stage command tracks like ``deepclick run`` otherwise)."""
    config = tmp_path / "settings.yaml"
    config.write_text(f"root: {tmp_path / 'var'}\nmlflow:\n  enabled: false\n")
    return config


def test_rerunning_index_for_the_served_date_is_refused_and_the_release_survives(
    tmp_path: Path,
) -> None:
    # Issue 12 item 4: `deepclick index --date <served date>` republished the served index in
    # place, and the next load refused the release.
    index = _serving_release_reading(tmp_path / "var", "20240103")
    before = sha256_file(index / "manifest.json")
    result = CliRunner().invoke(
        app, ["index", "--date", "2024-01-03", "--config", str(_config(tmp_path))]
    )
    assert result.exit_code == 1
    assert "would republish" in result.output and "20240103" in result.output
    assert sha256_file(index / "manifest.json") == before


def test_a_stage_command_waits_for_the_days_run_lock(tmp_path: Path) -> None:
    _serving_release_reading(tmp_path / "var", "20240103")
    settings = Settings(root=tmp_path / "var")
    finished: list[float] = []

    def command() -> None:
        CliRunner().invoke(
            app, ["embed", "--date", "2024-01-03", "--config", str(_config(tmp_path))]
        )
        finished.append(time.monotonic())

    with RunLedger.locked(settings, dt.date(2024, 1, 3)):
        worker = threading.Thread(target=command)
        worker.start()
        time.sleep(1.0)
        assert finished == []  # blocked on the lock `deepclick run` holds for that day
        released = time.monotonic()
    worker.join(60)
    assert finished and finished[0] >= released


@pytest.mark.parametrize("stage", ["features", "towers", "embed"])
def test_every_stage_command_refuses_to_republish_what_serving_reads(
    tmp_path: Path, stage: str
) -> None:
    root = tmp_path / "var"
    _serving_release_reading(root, "20240103")
    release = json.loads((root / "releases" / "20240103" / "release.json").read_text())
    release["embeddings"] = {"folder": "artifacts/embeddings/20240103"}
    release["feature_spec"] = {"folder": "warehouse/features/20240103"}
    with publishing(root / "releases", "20240103") as staging:
        (staging.path / "release.json").write_text(json.dumps(release))
    result = CliRunner().invoke(
        app, [stage, "--date", "2024-01-03", "--config", str(_config(tmp_path))]
    )
    assert result.exit_code == 1 and "would republish" in result.output


TIMING = {"finished_at", "checked_at", "seconds", "run_key", "produced_by"}
"""Ledger fields that name the invocation or its clock, not what the stage did."""


def _index_inputs(root: Path) -> None:
    """D's published features and embeddings (planted: same-group users and ads are close)."""
    from feature_folder import write_feature_folder
    from serving_world import planted_embeddings

    from candidates.store import publish_embeddings

    folder = write_feature_folder(
        root / "warehouse" / "features" / "20240103",
        users=80, placements=4, ads=120, new_ads=4, impressions_per_day=1500, train_days=2,
        seed=5,
    )  # fmt: skip
    tables, fallbacks = planted_embeddings(folder)
    publish_embeddings(root / "artifacts" / "embeddings", "20240103", tables, fallbacks)


def _small_index_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / f"{root.name}.yaml"
    config.write_text(
        f"root: {root}\nmlflow:\n  enabled: false\n"
        "index:\n  n_trees: 5\n  recall_queries: 50\n  recall_k: 20\n  recall_floor: 0.0\n"
        "lifecycle:\n  recall_ks: [10, 50]\n  gate_recall_k: 50\n  recall_queries: 200\n"
    )
    return config


def test_a_stage_command_writes_the_ledger_entry_deepclick_run_writes_and_skips_when_unchanged(
    tmp_path: Path,
) -> None:
    # Issue 13: `deepclick index` called the pipeline runner directly, beside the run ledger:
    # the next `deepclick run` redid the stage, and the command never skipped unchanged work.
    from io import StringIO

    from rich.console import Console

    from deepclick.settings import load_settings
    from lifecycle.daily import run_daily

    command_root, run_root = tmp_path / "command", tmp_path / "run"
    _index_inputs(command_root)
    shutil.copytree(command_root, run_root)  # the same manifests, byte for byte
    day = dt.date(2024, 1, 3)

    config = str(_small_index_config(tmp_path, command_root))

    def index_command(*extra: str) -> Any:
        return CliRunner().invoke(
            app, ["index", "--date", "2024-01-03", *extra, "--config", config]
        )

    first = index_command()
    assert first.exit_code == 0, first.output
    assert "index 2024-01-03: ran" in first.output and "ann_recall_at_k" in first.output
    by_command = RunLedger(Settings(root=command_root), day).entry("index")

    settings = load_settings(_small_index_config(tmp_path, run_root))
    report = run_daily(settings, day, stages=["index"], console=Console(file=StringIO()))
    assert [s.status for s in report.stages] == ["ran"]
    by_run = RunLedger(settings, day).entry("index")
    assert by_command["status"] == by_run["status"] == "done"
    assert {k: v for k, v in by_command.items() if k not in TIMING} == {
        k: v for k, v in by_run.items() if k not in TIMING
    }

    published = command_root / "artifacts" / "index" / "20240103" / "manifest.json"
    before = sha256_file(published)
    again = index_command()
    assert again.exit_code == 0, again.output
    assert "index 2024-01-03: skipped: inputs and settings unchanged" in again.output
    assert sha256_file(published) == before
    entry = RunLedger(Settings(root=command_root), day).entry("index")
    assert entry["last"] == "skipped" and entry["fingerprint"] == by_command["fingerprint"]

    forced = index_command("--force")
    assert forced.exit_code == 0, forced.output
    assert "index 2024-01-03: ran" in forced.output
    assert RunLedger(Settings(root=command_root), day).entry("index")["last"] == "ran"
