"""The one way deepclick builds a SparkSession.

Local mode (``local[*]``) is the embedded default; any ``--master`` (YARN, Kubernetes, standalone)
runs the same jobs. Python workers must run this very interpreter, or pandas/Arrow UDFs fail to
import their modules, so ``PYSPARK_PYTHON`` is pinned to ``sys.executable`` for local masters.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from deepclick.settings import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def spark_conf(settings: SparkSettings) -> dict[str, str]:
    """The Spark configuration deepclick relies on, as plain key/values (testable without Spark)."""
    conf = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.driver.memory": settings.driver_memory,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.parquet.compression.codec": "zstd",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "true",
        # Deterministic file naming and no _SUCCESS marker: manifests say what is complete.
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        "spark.hadoop.parquet.summary.metadata.level": "NONE",
    }
    if settings.master.startswith("local"):
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    conf.update(settings.extra_conf)
    return conf


def get_spark(settings: SparkSettings) -> SparkSession:
    """Return the process's SparkSession, creating it from ``settings`` on first use."""
    from pyspark.sql import SparkSession

    if settings.master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.master(settings.master).appName(settings.app_name)
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark
