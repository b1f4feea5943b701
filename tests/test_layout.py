"""One path layout (issue 13, item 3): every folder of day D is derived in ``deepclick.layout``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from deepclick import layout
from deepclick.settings import Settings
from lifecycle.stages import DayContext

D = dt.date(2024, 1, 2)


def test_day_layout_names_every_folder_of_the_day_under_the_root() -> None:
    day = layout.DayLayout(Path("/state"), D, "ranker")
    assert day.version == "20240102"
    assert day.events == Path("/state/warehouse/events/date=2024-01-02")
    assert day.features == Path("/state/warehouse/features/20240102")
    assert day.eval_rows == Path("/state/warehouse/features/20240102/eval")
    assert day.towers == Path("/state/artifacts/towers/20240102")
    assert day.embeddings == Path("/state/artifacts/embeddings/20240102")
    assert day.index == Path("/state/artifacts/index/20240102")
    assert day.ranker == Path("/state/model_repository/ranker/20240102")
    assert day.evaluation == Path("/state/evaluations/20240102")
    assert day.gate == Path("/state/registry/gates/20240102")
    assert day.challenger_release == Path("/state/challengers/20240102")
    assert day.run == Path("/state/runs/20240102")
    assert day.reports == Path("/state/reports/20240102")


def test_the_daily_context_and_the_settings_ask_the_layout(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    ctx = DayContext(settings, D, "marketplace", tmp_path / "raw")
    day = layout.DayLayout(tmp_path, D, settings.predictor.model_name)
    for name in ("events", "features", "towers", "embeddings", "index", "ranker", "evaluation"):
        assert getattr(ctx, name) == getattr(day, name), name
    assert ctx.gate == day.gate
    assert layout.warehouse(settings.root) == layout.warehouse(tmp_path)
    assert layout.model_repository(settings.root) == layout.model_repository(tmp_path)


def test_a_day_that_is_not_yyyy_mm_dd_is_refused_by_name() -> None:
    assert layout.parse_date("2024-01-02") == D and layout.version_for("2024-01-02") == "20240102"
    with pytest.raises(ValueError, match="'2024-13-01' is not a day in the form YYYY-MM-DD"):
        layout.parse_date("2024-13-01")
