"""Shared fixtures: one local SparkSession for the whole run (it takes seconds to start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deepclick.settings import Settings, SparkSettings


@pytest.fixture(scope="session")
def spark() -> Iterator:
    from pipelines.spark import get_spark

    # On tiny test data half of Spark's time is JIT compilation: the C1-only tier starts faster.
    jit = {
        "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m"
    }
    session = get_spark(
        SparkSettings(
            master="local[2]",
            shuffle_partitions=2,
            driver_memory="2g",
            log_level="ERROR",
            extra_conf=jit,
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
