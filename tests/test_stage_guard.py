"""Stand-alone stage commands hold what ``deepclick run`` holds (issue 12, item 4): the day's run
lock, and the serving guard that refuses to republish a folder the serving release reads."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

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
    config = tmp_path / "settings.yaml"
    config.write_text(f"root: {tmp_path / 'var'}\n")
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
