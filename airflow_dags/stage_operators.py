"""The operator of the cluster DAG: one Spark stage submitted with ``spark-submit``.

The submitted application is the driver ``deepclick_cli/spark_stage.py`` (``--stage S --date D
--run-key K``), an entry point that calls ``lifecycle.daily.run_stage``:
the driver runs the stage exactly as a local task would, ledger and MLflow included, so the two
DAGs differ only in where the Spark work happens. ``<root>`` must be shared by the Airflow worker
and the cluster (a shared filesystem or mount), since the ledger and the published folders are
how the task learns the outcome.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from deepclick.settings import CONFIG_ENV_VAR


class StageSparkSubmitOperator(SparkSubmitOperator):
    """``spark-submit deepclick_cli/spark_stage.py --stage <stage> …``, configured from the
    settings when the task runs and judged by the stage's run-ledger entry afterwards.

    Args:
        stage: a Spark stage of ``lifecycle/stages.py`` (ingest, features, embed).
    """

    def __init__(self, *, stage: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"deepclick-{stage}")
        super().__init__(
            application="deepclick_cli/spark_stage.py",  # the installed path, set at run time
            application_args=["--stage", stage, "--date", "{{ ds }}", "--run-key", "{{ run_id }}"],
            **kwargs,
        )
        self.stage = stage

    def configure(self, date: str, run_key: str) -> Any:
        """Load the settings now and apply the stage's spark-submit options; return the settings."""
        from deepclick.settings import load_settings
        from lifecycle.daily import spark_submit_options

        settings = load_settings()
        options = spark_submit_options(
            settings, self.stage, date, run_key, config=os.environ.get(CONFIG_ENV_VAR)
        )
        self.application = options["application"]
        self.application_args = options["application_args"]
        self.conf = options["conf"]
        self.py_files = options["py_files"]
        self.env_vars = {**(self.env_vars or {}), **options["env_vars"]}
        self.name = options["name"]
        self._conn_id = options["conn_id"]
        self._hook = None  # rebuilt from the options above
        return settings

    def execute(self, context: Any) -> dict[str, Any]:
        from lifecycle.daily import confirm_stage

        since = dt.datetime.now(dt.UTC)
        date, run_key = str(context["ds"]), str(context["run_id"])
        settings = self.configure(date, run_key)
        super().execute(context)
        entry = confirm_stage(settings, date, self.stage, since=since)
        return {
            "stage": self.stage,
            "date": date,
            "last": entry.get("last"),
            "note": entry.get("note", ""),
        }
