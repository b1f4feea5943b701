"""MLflow tracking of daily runs: one experiment with the configured artifact folder, a parent run
per daily run (re-opened by the next Airflow task of the same run), nested stage runs with params,
step-by-step curves and artifacts, skipped stages tagged as such, models registered as challenger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepclick.settings import MlflowSettings, Settings
from lifecycle.registry import CHALLENGER
from lifecycle.tracking import (
    PARENT_TAG,
    STATUS_TAG,
    MlflowTracker,
    StageRecord,
    Tracker,
    code_version,
    flatten,
    make_tracker,
    numeric,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(root=tmp_path_factory.mktemp("tracking") / "var")


@pytest.fixture(scope="module")
def tracker(settings: Settings) -> MlflowTracker:
    return MlflowTracker(settings)


def test_the_experiment_lives_in_the_embedded_store_with_its_artifact_folder(
    settings: Settings, tracker: MlflowTracker
) -> None:
    assert (settings.root / "mlflow" / "mlflow.db").is_file()
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.name == "deepclick"
    assert experiment.artifact_location == settings.mlflow_artifact_location
    # a second tracker (the next Airflow task) finds the same experiment
    assert MlflowTracker(settings).experiment_id == tracker.experiment_id


def test_a_daily_run_is_a_parent_with_nested_stage_runs(
    settings: Settings, tracker: MlflowTracker, tmp_path: Path
) -> None:
    client = tracker.client
    params = {"settings": settings.model_dump(mode="json", exclude={"root"}), **code_version()}
    parent = tracker.start(date="2024-01-03", dataset="marketplace", run_key="k1", params=params)
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"auc": 0.7}))
    ran = tracker.stage(
        StageRecord(
            "ranker",
            "ran",
            12.5,
            params={"fingerprint": "abc", "settings.ranker.epochs": 3},
            metrics={"holdout_auc": 0.71, "not_a_number": float("nan")},
            curves={"train.loss": [0.6, 0.4, 0.3]},
            artifacts=[("evaluation", report), ("manifests", report / "metrics.json")],
        )
    )
    skipped = tracker.stage(StageRecord("ingest", "skipped", 0.01))

    # the next task of the same Airflow run re-opens the same parent
    again = MlflowTracker(settings)
    assert again.start(date="2024-01-03", dataset="marketplace", run_key="k1", params={}) == parent
    tracker.finish("FINISHED", {"seconds": 14.0})

    stage = client.get_run(ran)
    assert stage.data.tags[PARENT_TAG] == parent
    assert stage.data.tags[STATUS_TAG] == "ran"
    assert stage.data.params["settings.ranker.epochs"] == "3"
    assert stage.data.metrics["holdout_auc"] == pytest.approx(0.71)
    assert "not_a_number" not in stage.data.metrics
    history = client.get_metric_history(ran, "train.loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.6), (1, 0.4), (2, 0.3)]
    logged = {a.path for a in client.list_artifacts(ran)}
    assert logged == {"evaluation", "manifests"}
    assert client.get_run(skipped).data.tags[STATUS_TAG] == "skipped"
    top = client.get_run(parent)
    assert top.info.status == "FINISHED"
    assert top.data.params["date"] == "2024-01-03"
    assert top.data.params["package_version"] == code_version()["package_version"]
    assert top.data.params["settings.ranker.epochs"] == str(settings.ranker.epochs)
    assert top.data.metrics["ranker.seconds"] == pytest.approx(12.5)


def test_a_registered_folder_becomes_the_challenger(tracker: MlflowTracker, tmp_path: Path) -> None:
    tracker.start(date="2024-01-04", dataset="marketplace", run_key="k2", params={})
    run = tracker.stage(StageRecord("towers", "ran", 1.0))
    model = tmp_path / "towers"
    (model / "user").mkdir(parents=True)
    (model / "user" / "saved_model.pb").write_bytes(b"planted")
    version = tracker.register("towers", run, model, {"deepclick.date": "2024-01-04"})
    client = tracker.client
    assert str(client.get_model_version_by_alias("deepclick-towers", CHALLENGER).version) == version
    assert {a.path for a in client.list_artifacts(run, "towers")} == {"towers/user"}
    assert client.get_run(run).data.tags["deepclick.registered.towers"] == version


def test_tracking_off_is_a_silent_tracker(tmp_path: Path) -> None:
    off = make_tracker(Settings(root=tmp_path, mlflow=MlflowSettings(enabled=False)))
    assert type(off) is Tracker and not off.enabled
    assert off.start(date="d", dataset="x", run_key="k", params={}) is None
    assert off.stage(StageRecord("ingest", "ran", 1.0)) is None
    assert not (tmp_path / "mlflow").exists()


def test_settings_and_manifests_flatten_to_params_and_metrics() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": {},
    }
    assert numeric({"counts": {"rows": 3, "ok": True, "name": "x"}, "auc@10": 0.5}) == {
        "counts.rows": 3.0,
        "auc_10": 0.5,
    }


def test_code_version_names_the_package_and_the_commit() -> None:
    found = code_version()
    assert found["package_version"] != "unknown"
    if (Path(__file__).resolve().parent.parent / ".git").exists():
        assert len(found["git_commit"]) == 40


def test_a_copied_state_root_writes_mlflow_artifacts_into_itself(tmp_path: Path) -> None:
    # Issue 12 item 8: the experiment's artifact location was absolute, so a copied or moved
    # state root kept writing artifacts into the old one.
    import shutil

    first = Settings(root=tmp_path / "first")
    tracker = MlflowTracker(first)
    tracker.start(date="2024-01-03", dataset="marketplace", run_key="k", params={})
    note = tmp_path / "note.txt"
    note.write_text("first")
    tracker.stage(StageRecord("ranker", "done", 1.0, artifacts=[("notes", note)]))
    shutil.copytree(first.root, tmp_path / "second")
    shutil.rmtree(first.root)  # moved, not copied: the old root is gone
    second = Settings(root=tmp_path / "second")
    moved = MlflowTracker(second)
    experiment = moved.client.get_experiment(moved.experiment_id)
    assert experiment.artifact_location == second.mlflow_artifact_location
    moved.start(date="2024-01-04", dataset="marketplace", run_key="k2", params={})
    run_id = moved.stage(StageRecord("ranker", "done", 1.0, artifacts=[("notes", note)]))
    run = moved.client.get_run(str(run_id))
    assert run.info.artifact_uri.startswith(second.mlflow_artifact_location)
    assert list((second.root / "mlflow" / "artifacts").rglob("note.txt"))
    assert not first.root.exists()
    old_runs = moved.client.search_runs(
        [moved.experiment_id], "tags.`deepclick.date` = '2024-01-03'"
    )
    assert all(r.info.artifact_uri.startswith(second.mlflow_artifact_location) for r in old_runs)
