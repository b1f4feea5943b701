"""The Airflow DAGs: the folder imports cleanly, the graph is the designed one, scheduling comes
from ``settings.lifecycle``, and the cluster variant submits the Spark stages with spark-submit.

The DAG running a whole day end to end (``dag.test()``) is the first chapter of the daily story in
``test_daily.py``, which shares this module's Airflow home (:func:`airflow_home`): one generated
dataset and one pipeline run serve both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepclick.settings import LifecycleSettings, Settings
from lifecycle.stages import SPARK_STAGES, STAGE_NAMES

DAGS = Path(__file__).resolve().parent.parent / "airflow_dags"
_STATE: dict[str, Path] = {}


def airflow_home(base: Path) -> Path:
    """Give Airflow a private home with a SQLite metadata db, once per test process.

    Airflow reads its configuration when it is first imported, so every module of the session
    must agree on one home: the first caller chooses it (under its temporary folder).
    """
    if "home" not in _STATE:
        home = base / "airflow-home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            }
        )
        _STATE["home"] = home
    return _STATE["home"]


def airflow_db() -> None:
    """``airflow db migrate`` on the SQLite db of :func:`airflow_home`, once per process."""
    if "db" not in _STATE:
        from airflow.utils import db

        db.upgradedb()
        _STATE["db"] = _STATE["home"] / "airflow.db"


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """Airflow configures the root logger and routes warnings into logging when imported; put
    both back so the tests after these see the process as they would without Airflow."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
        warnings.showwarning = showwarning


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    airflow_home(tmp_path_factory.getbasetemp())
    with restored_logging():
        from airflow.dag_processing.dagbag import DagBag

        yield DagBag(dag_folder=str(DAGS))


def test_the_dag_folder_imports_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"deepclick_daily", "deepclick_daily_cluster"} <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", ["deepclick_daily", "deepclick_daily_cluster"])
def test_one_task_per_stage_in_a_chain(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert [t.task_id for t in dag.topological_sort()] == list(STAGE_NAMES)
    for before, after in itertools.pairwise(STAGE_NAMES):
        assert dag.get_task(before).downstream_task_ids == {after}
    assert dag.get_task("ingest").upstream_task_ids == set()


def test_scheduling_comes_from_the_lifecycle_settings(dagbag) -> None:
    from airflow.sdk import CronDataIntervalTimetable

    cfg = LifecycleSettings()
    dag = dagbag.dags["deepclick_daily"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)  # D = the interval's start
    assert dag.catchup is cfg.catchup and dag.max_active_runs == 1
    assert dag.start_date == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for task in dag.tasks:
        assert task.retries == cfg.retries
        assert task.retry_delay == dt.timedelta(seconds=cfg.retry_delay_s)
        assert task.retry_exponential_backoff == cfg.retry_backoff == 2.0
        assert task.max_retry_delay == dt.timedelta(seconds=cfg.max_retry_delay_s)


def test_local_tasks_get_the_logical_date_and_load_settings_when_they_run(dagbag) -> None:
    from airflow.providers.standard.operators.python import PythonOperator

    for task in dagbag.dags["deepclick_daily"].tasks:
        assert isinstance(task, PythonOperator)
        assert task.op_kwargs == {
            "stage": task.task_id,
            "date": "{{ ds }}",
            "run_key": "{{ run_id }}",
        }
        # the callable is a thin import-and-call: nothing of the settings is bound at parse time
        assert task.python_callable.__name__ == "run_stage_task"


def test_a_broken_settings_file_does_not_hide_the_dags(monkeypatch, tmp_path: Path) -> None:
    from lifecycle.daily import scheduling_settings

    broken = tmp_path / "broken.yaml"
    broken.write_text("lifecycle: {retries: -3}\n")
    monkeypatch.setenv("DEEPCLICK_CONFIG", str(broken))
    assert scheduling_settings() == LifecycleSettings()
    good = tmp_path / "good.yaml"
    good.write_text("lifecycle: {retries: 5, catchup: true}\n")
    monkeypatch.setenv("DEEPCLICK_CONFIG", str(good))
    assert (scheduling_settings().retries, scheduling_settings().catchup) == (5, True)


def test_the_cluster_dag_submits_the_spark_stages(dagbag, monkeypatch, tmp_path: Path) -> None:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    from airflow.providers.standard.operators.python import PythonOperator

    from airflow_dags.stage_operators import StageSparkSubmitOperator

    dag = dagbag.dags["deepclick_daily_cluster"]
    for task in dag.tasks:
        expected = StageSparkSubmitOperator if task.task_id in SPARK_STAGES else PythonOperator
        assert isinstance(task, expected), task.task_id
    assert set(SPARK_STAGES) == {"ingest", "features", "embed"}

    config = tmp_path / "deepclick.yaml"
    config.write_text(
        f"root: {tmp_path / 'var'}\n"
        "lifecycle:\n"
        "  spark_submit_conn_id: deepclick_spark\n"
        "  spark_submit_conf: {spark.executor.memory: 2g}\n"
        "  spark_submit_py_files: /opt/deepclick.zip\n"
    )
    monkeypatch.setenv("DEEPCLICK_CONFIG", str(config))
    monkeypatch.setenv(
        "AIRFLOW_CONN_DEEPCLICK_SPARK", '{"conn_type": "spark", "host": "spark://master:7077"}'
    )
    task = dag.get_task("features")
    assert isinstance(task, SparkSubmitOperator)
    task.configure("2024-01-03", "scheduled__2024-01-03")  # what execute() does first
    command = task._get_hook()._build_spark_submit_command(task.application)
    assert command[:3] == ["spark-submit", "--master", "spark://master:7077"]
    assert "spark.executor.memory=2g" in command
    assert command[command.index("--py-files") + 1] == "/opt/deepclick.zip"
    app = command.index(task.application)
    driver = Path(__file__).resolve().parent.parent / "deepclick_cli" / "spark_stage.py"
    assert Path(task.application) == driver
    assert command[app + 1 :] == [
        "--stage",
        "features",
        "--date",
        "2024-01-03",
        "--run-key",
        "scheduled__2024-01-03",
        "--config",
        str(config),
    ]


def test_the_spark_submit_driver_runs_one_stage(monkeypatch) -> None:
    """``deepclick_cli/spark_stage.py`` as the submitted application: arguments reach
    ``run_stage``."""
    import deepclick_cli.spark_stage as driver
    import lifecycle.daily as daily

    calls = []
    monkeypatch.setattr(driver, "run_stage", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(driver, "load_settings", lambda config=None: Settings(root=Path("/x")))
    assert driver.main(["--stage", "embed", "--date", "2024-01-03", "--run-key", "r1"]) == 0
    ((args, kwargs),) = calls
    assert args[1:] == ("2024-01-03", "embed") and kwargs["run_key"] == "r1"
    with pytest.raises(ValueError, match="does not run on Spark"):
        daily.spark_submit_options(Settings(root=Path("/x")), "towers", "2024-01-03", "r1")


def test_the_readme_airflow_command_is_absolute_migrated_and_without_back_off(
    monkeypatch,
) -> None:
    """Issue 11 item 14: `airflow dags test` as the README prints it failed on a relative
    SQLite path, needed `airflow db migrate`, and waited out production retry back-off (about
    9 minutes) on a failing stage."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = readme.split("export AIRFLOW_HOME=", 1)[1].split("```", 1)[0]
    exports = dict(
        item.split("=", 1) for item in ("AIRFLOW_HOME=" + command.splitlines()[0]).split()
    )
    assert exports["AIRFLOW_HOME"].startswith("$PWD/")
    assert "airflow db migrate && " in command and "dags test deepclick_daily" in command
    for key, value in exports.items():
        if key.startswith("DEEPCLICK_"):
            monkeypatch.setenv(key, value)
    from airflow_dags.deepclick_daily import DAG_ID, build_dag

    with restored_logging():
        dag = build_dag(DAG_ID, cluster=False)
    assert {task.retries for task in dag.tasks} == {0}
