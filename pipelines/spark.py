"""The one way deepclick builds a SparkSession.

Local mode (``local[*]``) is the embedded default; any ``--master`` (YARN, Kubernetes, standalone)
runs the same jobs. Under ``spark-submit`` the submission's ``--master`` and ``--conf`` win: the
settings' master is not applied to a driver that spark-submit launched. Python workers must run
this very interpreter, or pandas/Arrow UDFs fail to import their modules, so ``PYSPARK_PYTHON``
is pinned to ``sys.executable`` for local masters.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from deepclick.settings import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


LOCAL_ONLY_CONF = ("spark.driver.host", "spark.driver.bindAddress")
"""Loopback binding of local mode; wrong for any driver a cluster must reach."""


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


def submitted_by_spark_submit() -> bool:
    """True in a Python driver that spark-submit launched: its JVM gateway already runs
    (pyspark itself connects to it through ``PYSPARK_GATEWAY_PORT``) with the submission's
    ``--master`` and ``--conf`` already set."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_spark(settings: SparkSettings) -> SparkSession:
    """Return the process's SparkSession, creating it from ``settings`` on first use.

    A driver launched by spark-submit keeps the submission's master (the cluster DAG's connection)
    and its ``--conf`` values; only keys the submission did not set are added from ``settings``.
    """
    from pyspark.sql import SparkSession

    submitted = submitted_by_spark_submit()
    builder = SparkSession.builder.appName(settings.app_name)
    if submitted:
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()  # connect to spark-submit's JVM, whose conf we read
        given = dict(SparkConf().getAll())  # what spark-submit passed
        conf = {
            k: v
            for k, v in spark_conf(settings).items()
            if k not in given and k not in LOCAL_ONLY_CONF
        }
    else:
        if settings.master.startswith("local"):
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.master(settings.master)
        conf = spark_conf(settings)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark
