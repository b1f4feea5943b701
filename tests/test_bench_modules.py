"""Every benchmark under ``bench/`` imports and answers ``--help``.

The benchmarks are run by hand (``python -m bench.<name>``), so no other test executes them: a
helper moved elsewhere in the package broke ``bench.funnel_towers`` at import
(``version_for`` left ``deepclick.publish`` for ``deepclick.layout``) and nothing noticed. This
keeps every one of them at least loadable and its command line intact.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
HELPERS = {"__init__", "common", "ranker_variants"}
"""Modules of ``bench/`` that are shared code, not commands."""

COMMANDS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in HELPERS)


def test_the_benchmarks_are_found() -> None:
    assert {"quality", "serving", "funnel_towers", "match_ceiling"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_benchmark_imports_and_prints_its_usage(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out
