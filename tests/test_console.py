"""Issue 11 item 12: library banners, JVM output and library warnings go to a log file under the
state root (its path printed once); this project's warnings and the result stay on the console;
``--verbose`` brings the rest back. Run in real subprocesses: the redirection is of file
descriptor 2, which native code and the Spark JVM write to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from layouts import taobao_source
from local_spark import fast_local_env

REPO = Path(__file__).resolve().parents[1]

ROUTED = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from pathlib import Path
    from deepclick.library_logs import route_library_output
    routed = route_library_output(Path(sys.argv[1]))
    os.write(2, b"oneDNN custom operations are on\\n")  # what native code writes
    warnings.warn("a library's FutureWarning")
    logging.getLogger("tensorflow").info("absl banner")
    logging.getLogger("pipelines.features").warning("ingest earlier days")
    print("stage table")
    routed.restore()
    os.write(2, b"after restore\\n")
    print(routed.path)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_library_output_goes_to_the_log_file_and_own_warnings_stay(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", ROUTED, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    )
    path = Path(done.stdout.splitlines()[-1])
    assert path.parent == tmp_path / "logs"
    assert done.stdout.splitlines()[0] == "stage table"
    assert done.stderr.splitlines() == [
        "WARNING pipelines.features: ingest earlier days",
        "after restore",
    ]
    logged = path.read_text()
    for noise in ("oneDNN custom operations", "FutureWarning", "absl banner"):
        assert noise in logged


@pytest.mark.spark
def test_ingest_console_shows_the_table_and_the_log_path_only(tmp_path: Path) -> None:
    taobao_source(tmp_path / "raw")
    root = tmp_path / "state"
    command = ["ingest", "--dataset", "taobao", "--source", str(tmp_path / "raw")]
    done = subprocess.run(
        [sys.executable, "-m", "deepclick_cli", *command, "--date", "2017-05-09"],
        capture_output=True,
        text=True,
        env={
            **_env(),
            **fast_local_env(),
            "DEEPCLICK_ROOT": str(root),
            "DEEPCLICK_SPARK__MASTER": "local[1]",
        },
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert "ingest taobao" in done.stdout and "quarantined 1: malformed line" in done.stdout
    assert "log4j" not in done.stdout and "[Stage" not in done.stdout
    shown = [line for line in done.stdout.splitlines() if "library output" in line]
    assert len(shown) == 1
    (log,) = (root / "logs").iterdir()
    assert shown[0].endswith(str(log))
    assert "log4j" in log.read_text()


def test_verbose_routes_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deepclick_cli", "--verbose", "specs"],
        capture_output=True,
        text=True,
        env={**_env(), "DEEPCLICK_ROOT": str(tmp_path)},
        timeout=120,
        check=True,
    )
    assert "talkingdata" in done.stdout and "library output" not in done.stdout
    assert not (tmp_path / "logs").exists()
