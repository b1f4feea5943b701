"""How deepclick builds its SparkSession: the settings' master in a plain process, the submission's
master and ``--conf`` in a driver that spark-submit launched (the cluster DAG's path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_spark import JIT_OPTIONS

from deepclick.settings import SparkSettings
from pipelines.spark import LOCAL_ONLY_CONF, spark_conf

pytestmark = pytest.mark.spark

DRIVER = """
import json, sys
from deepclick.settings import SparkSettings
from pipelines.spark import get_spark

spark = get_spark(SparkSettings(master="local[2]", shuffle_partitions=5, log_level="ERROR"))
conf = spark.sparkContext.getConf()
print("RESULT " + json.dumps({
    "master": spark.sparkContext.master,
    "shuffle": conf.get("spark.sql.shuffle.partitions"),
    "timezone": conf.get("spark.sql.session.timeZone"),
    "rows": spark.range(10).count(),
}))
spark.stop()
"""


def test_local_masters_bind_to_loopback_and_clusters_do_not() -> None:
    assert set(LOCAL_ONLY_CONF) <= spark_conf(SparkSettings(master="local[*]")).keys()
    assert not set(LOCAL_ONLY_CONF) & spark_conf(SparkSettings(master="yarn")).keys()


def test_spark_submit_keeps_its_master_and_conf(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    submit = Path(sys.executable).parent / "spark-submit"
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    done = subprocess.run(
        [
            str(submit),
            "--master",
            "local[1]",
            "--conf",
            "spark.sql.shuffle.partitions=3",
            "--conf",
            "spark.driver.bindAddress=127.0.0.1",
            "--driver-java-options",
            JIT_OPTIONS,
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["master"] == "local[1]"  # the submission's, not the settings' local[2]
    assert result["shuffle"] == "3"  # the submission's --conf wins
    assert result["timezone"] == "UTC"  # settings fill what the submission left out
    assert result["rows"] == 10
