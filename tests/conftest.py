"""Shared fixtures: one local SparkSession for the whole run (it takes seconds to start), and the
serving tests' world of real releases (tests/serving_world.py), built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deepclick.settings import Settings, SparkSettings

if TYPE_CHECKING:
    from serving_world import World

    from serving.release import LoadedRelease


@pytest.fixture(scope="session")
def spark() -> Iterator:
    from local_spark import FAST_LOCAL_CONF

    from pipelines.spark import get_spark

    session = get_spark(
        SparkSettings(
            master="local[2]",
            shuffle_partitions=2,
            driver_memory="2g",
            log_level="ERROR",
            extra_conf=FAST_LOCAL_CONF,
        )
    )
    yield session
    session.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings rooted in a fresh temporary folder, sized for tests."""
    return Settings(
        root=tmp_path / "var",
        spark=SparkSettings(master="local[2]", shuffle_partitions=2, driver_memory="2g"),
    )


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The serving tests' releases over planted data (tests/serving_world.py), built once per
    session; modules with a world of their own (test_daily, test_simulate…) override it."""
    from serving_world import build_serving_world

    return build_serving_world(tmp_path_factory.getbasetemp() / "serving-world")


@pytest.fixture(scope="module")
def loaded(world: World) -> LoadedRelease:
    """The world's first release, loaded and validated as a serving worker does (per module)."""
    from serving.release import load_release

    return load_release(world.release, world.settings())
