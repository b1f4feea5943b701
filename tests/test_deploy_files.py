"""The production files in deploy/ cannot run here (no container engine), so they are checked
against the real message types and each other: a typo in a text protobuf or a path that does not
line up would otherwise only show in production."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from lifecycle.tfserving_repository import REPOSITORY

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_models_config_parses_as_model_server_config() -> None:
    config = text_format.Parse(
        (DEPLOY / "tfserving" / "models.config").read_text(),
        model_server_config_pb2.ModelServerConfig(),
    )
    models = {c.name: c for c in config.model_config_list.config}
    assert set(models) == {"ranker"}
    ranker = models["ranker"]
    assert ranker.model_platform == "tensorflow"
    assert ranker.base_path == "/models/repository/ranker"
    assert ranker.model_version_policy.latest.num_versions == 2  # previous release stays loaded
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[1::-1] for v in compose["services"]["tfserving"]["volumes"])
    assert mounts["/models/repository"] == f"../var/{REPOSITORY}"  # champions only


def test_batching_and_monitoring_configs_use_known_fields() -> None:
    batching = (DEPLOY / "tfserving" / "batching.config").read_text()
    fields = set(re.findall(r"^(\w+)", batching, flags=re.M))
    known = {
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "allowed_batch_sizes",
        "pad_variable_length_inputs",
        "thread_pool_name",
        "enable_large_batch_splitting",
    }
    assert fields and fields <= known, fields - known
    monitoring = (DEPLOY / "tfserving" / "monitoring.config").read_text()
    assert re.search(r'path:\s*"/monitoring/prometheus/metrics"', monitoring)


def test_compose_wires_tf_serving_to_the_api_and_config_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    args = services["tfserving"]["command"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["tfserving"]["volumes"]}
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        value = next(a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}="))
        folder, name = value.rsplit("/", 1)
        assert (DEPLOY / mounted[folder].removeprefix("./") / name).is_file(), value
    api_env = services["api"]["environment"]
    assert api_env["DEEPCLICK_PREDICTOR__BACKEND"] == "grpc"
    assert api_env["DEEPCLICK_PREDICTOR__TARGET"] == "tfserving:8500"
    # batching merges requests along the first dimension: only serving_default batches
    assert "--enable_batching=true" in args
    assert api_env["DEEPCLICK_PREDICTOR__SIGNATURE"] == "serving_default"
    assert "--app-name=basic-auth" in services["mlflow"]["command"]


def test_compose_reads_credentials_from_an_env_file_and_exposes_no_unauthenticated_port() -> None:
    # Issue 12 item 8: Postgres credentials were hard-coded, MLflow and TF Serving published.
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert not re.search(r"(?i)password\s*[:=]\s*\S", text)
    assert "postgresql://" not in text
    for name in ("postgres", "mlflow", "api"):
        assert services[name]["env_file"] == ["deploy.env"], name
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "deploy.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert {"POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"} <= set(
        example
    )
    ignored = (DEPLOY.parent / ".gitignore").read_text().splitlines()
    assert "deploy/deploy.env" in ignored
    assert "ports" not in services["tfserving"]  # no authentication of its own
    assert all(port.startswith("127.0.0.1:") for port in services["mlflow"]["ports"])
    assert "mlflow[auth]" in (DEPLOY / "mlflow.Dockerfile").read_text()
