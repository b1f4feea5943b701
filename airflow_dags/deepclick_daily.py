"""The daily retraining DAGs (DESIGN.md, "Airflow"): scheduling only, the logic is in pipelines/.

- ``deepclick_daily``: one task per stage of ``lifecycle/stages.py``, each running that stage in
  the worker (``lifecycle.daily.airflow_task``);
- ``deepclick_daily_cluster``: the same graph, but the Spark stages (ingest, features, embed) are
  handed to ``spark-submit`` (:class:`airflow_dags.stage_operators.StageSparkSubmitOperator`),
  with the connection, ``--conf`` and ``--py-files`` taken from ``settings.lifecycle`` when the
  task runs. Deployments unpause the one that fits.

D is the run's logical date (``{{ ds }}``). The schedule is a data-interval cron, so the scheduled
run for D starts once D is over and its logs are complete. Settings are loaded by each task when it
runs; only the scheduling knobs (schedule, start date, catchup, retries and their exponential
backoff) are read when this file is parsed, because Airflow fixes them there. Each task is judged
by the stage's run-ledger entry and published manifest, not only by its exit status.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, CronDataIntervalTimetable

from airflow_dags.stage_operators import StageSparkSubmitOperator
from lifecycle.daily import scheduling_settings
from lifecycle.stages import SPARK_STAGES, STAGE_NAMES

DAG_ID = "deepclick_daily"
CLUSTER_DAG_ID = "deepclick_daily_cluster"


def run_stage_task(stage: str, date: str, run_key: str) -> dict[str, Any]:
    """Run one stage in this worker (imported here: parsing the DAG must not load Spark or TF)."""
    from lifecycle.daily import airflow_task

    return airflow_task(stage, date, run_key)


def build_dag(dag_id: str, *, cluster: bool) -> DAG:
    """The chain ingest → … → publish, one task per stage."""
    cfg = scheduling_settings()
    default_args = {
        "owner": "deepclick",
        "retries": cfg.retries,
        "retry_delay": dt.timedelta(seconds=cfg.retry_delay_s),
        "retry_exponential_backoff": cfg.retry_backoff,
        "max_retry_delay": dt.timedelta(seconds=cfg.max_retry_delay_s),
    }
    with DAG(
        dag_id,
        description="deepclick daily retraining: ingest D, retrain, evaluate, gate, release",
        schedule=CronDataIntervalTimetable(cfg.schedule, timezone="UTC"),
        start_date=dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.UTC),
        catchup=cfg.catchup,
        max_active_runs=1,  # day D+1 trains on D: days run one after the other
        default_args=default_args,
        tags=["deepclick", "cluster" if cluster else "local"],
        doc_md=__doc__,
    ) as dag:
        previous = None
        for stage in STAGE_NAMES:
            if cluster and stage in SPARK_STAGES:
                task = StageSparkSubmitOperator(task_id=stage, stage=stage)
            else:
                task = PythonOperator(
                    task_id=stage,
                    python_callable=run_stage_task,
                    op_kwargs={"stage": stage, "date": "{{ ds }}", "run_key": "{{ run_id }}"},
                )
            if previous is not None:
                previous >> task
            previous = task
    return dag


deepclick_daily = build_dag(DAG_ID, cluster=False)
deepclick_daily_cluster = build_dag(CLUSTER_DAG_ID, cluster=True)
