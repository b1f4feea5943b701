"""Gates, the append-only decision ledger, "what served on day X", and the MLflow aliases.

The gates are pure: planted metric sets with a known verdict. The ledger and ``served_on`` are
checked on hand-written decisions; the MLflow mirror against a real SQLite store.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from deepclick.settings import LifecycleSettings, Settings
from lifecycle.gate import judge
from lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    PROMOTED,
    REFUSED,
    MlflowRegistry,
    append_decision,
    current_champion,
    decisions_path,
    read_decisions,
    served_on,
)

GATES = LifecycleSettings(
    gate_min_auc=0.6,
    gate_auc_tolerance=0.01,
    gate_calibration_min=0.9,
    gate_calibration_max=1.1,
    recall_ks=[50, 100],
    gate_recall_k=100,
    gate_recall_tolerance=0.02,
    gate_min_recall=0.1,
)
GOOD = {"auc": 0.70, "calibration_ratio": 1.02, "recall_at_100": 0.40}


def failed(result) -> set[str]:
    return {c.name for c in result.checks if not c.passed}


def test_first_model_needs_only_the_absolute_bounds() -> None:
    result = judge(GOOD, None, GATES)
    assert result.promote and not result.compared_with_champion
    assert result.reason == "passed every gate against the absolute bounds"


@pytest.mark.parametrize(
    ("change", "broken"),
    [
        ({"auc": 0.55}, {"auc"}),
        ({"calibration_ratio": 0.85}, {"calibration_ratio"}),
        ({"calibration_ratio": 1.2}, {"calibration_ratio"}),
        ({"recall_at_100": 0.05}, {"recall_at_100"}),
        ({"auc": float("nan")}, {"auc"}),
    ],
)
def test_absolute_bounds_refuse_a_first_model(change: dict, broken: set[str]) -> None:
    result = judge({**GOOD, **change}, None, GATES)
    assert not result.promote
    assert failed(result) == broken
    assert result.reason.startswith("refused: ")


def test_a_challenger_may_lose_at_most_the_tolerance_to_the_champion() -> None:
    champion = {"auc": 0.705, "calibration_ratio": 1.0, "recall_at_100": 0.41}
    # 0.005 AUC and 0.01 recall worse: inside the tolerances (0.01, 0.02)
    assert judge(GOOD, champion, GATES).promote
    worse = {**GOOD, "auc": 0.69}  # 0.015 below the champion
    result = judge(worse, champion, GATES)
    assert not result.promote and failed(result) == {"auc_vs_champion"}
    check = next(c for c in result.checks if c.name == "auc_vs_champion")
    assert check.value == pytest.approx(0.69) and check.bound == pytest.approx(0.695)
    lost_recall = {**GOOD, "recall_at_100": 0.38}
    assert failed(judge(lost_recall, champion, GATES)) == {"recall_at_100_vs_champion"}


def test_a_champion_without_the_gated_metric_refuses_rather_than_passes() -> None:
    result = judge(GOOD, {"auc": 0.6}, GATES)
    assert not result.promote and failed(result) == {"recall_at_100_vs_champion"}


def test_gate_settings_must_gate_a_measured_recall() -> None:
    with pytest.raises(ValueError, match="gate_recall_k 20 is not among recall_ks"):
        LifecycleSettings(recall_ks=[50, 100], gate_recall_k=20)
    with pytest.raises(ValueError, match="gate_calibration_min"):
        LifecycleSettings(gate_calibration_min=1.2, gate_calibration_max=1.1)


def _decision(date: str, action: str, ranker: str, towers: bool = True) -> dict:
    return {
        "date": date,
        "action": action,
        "release": ranker if action == PROMOTED else None,
        "challenger": {
            "ranker": {"version": ranker, "registered_version": ranker[-1]},
            "towers": {"version": ranker, "registered_version": ranker[-1] if towers else None},
        },
        "metrics": {"challenger": {"auc": 0.7}},
    }


def test_the_ledger_appends_and_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    first = append_decision(settings, _decision("2024-01-02", PROMOTED, "20240102"))
    append_decision(settings, _decision("2024-01-03", REFUSED, "20240103"))
    with decisions_path(settings).open("a") as handle:  # a crash in the middle of a write
        handle.write('{"action": "prom')
    records = read_decisions(settings)
    assert [r["action"] for r in records] == [PROMOTED, REFUSED]
    assert records[0]["id"] == first["id"] and records[0]["decided_at"]
    assert current_champion(settings)["id"] == first["id"]
    with pytest.raises(ValueError, match="action"):
        append_decision(settings, {"date": "2024-01-04", "action": "maybe"})


def test_served_on_answers_by_logical_day(tmp_path: Path) -> None:
    settings = Settings(root=tmp_path)
    append_decision(settings, _decision("2024-01-02", PROMOTED, "20240102"))
    append_decision(settings, _decision("2024-01-03", REFUSED, "20240103"))
    append_decision(settings, _decision("2024-01-04", PROMOTED, "20240104"))
    # built for D (trained before D, judged on D) → serves from D + 1
    assert served_on(settings, "2024-01-02") is None
    assert served_on(settings, "2024-01-03").release == "20240102"
    assert served_on(settings, dt.date(2024, 1, 4)).release == "20240102"  # D3 was refused
    later = served_on(settings, "2024-02-01")
    assert later.release == "20240104" and later.built_for == "2024-01-04"
    assert later.registered == {"towers": "4", "ranker": "4"}
    # a re-run of a day promoted again later wins for the days after it
    append_decision(settings, _decision("2024-01-04", PROMOTED, "20240109"))
    assert served_on(settings, "2024-01-05").release == "20240109"


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("registry", artifact_location=(root / "a").as_uri())
    return client, experiment


def test_registering_makes_a_challenger_and_promotion_moves_champion(
    tmp_path: Path, mlflow_client
) -> None:
    client, experiment = mlflow_client
    registry = MlflowRegistry(client, Settings(root=tmp_path).mlflow)
    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"planted")
    versions = []
    for _ in range(2):
        run = client.create_run(experiment).info.run_id
        client.log_artifacts(run, str(model), "ranker")
        versions.append(registry.register("ranker", run, "ranker", {"deepclick.date": "d"}))
    assert versions == ["1", "2"]
    assert registry.alias("ranker", CHALLENGER) == "2"
    assert registry.alias("ranker", CHAMPION) is None
    source = client.get_model_version("deepclick-ranker", "2").source
    assert source.endswith("/artifacts/ranker") and source.startswith("file://")

    promoted = append_decision(
        Settings(root=tmp_path),
        {**_decision("2024-01-02", PROMOTED, "v2", towers=False), "reason": "passed every gate"},
    )
    registry.record(promoted)
    assert registry.alias("ranker", CHAMPION) == "2"
    assert registry.alias("ranker", CHALLENGER) is None  # decided: no longer a challenger
    tags = client.get_model_version("deepclick-ranker", "2").tags
    assert tags["deepclick.decision"] == PROMOTED
    assert tags["deepclick.decision_id"] == promoted["id"]
    assert float(tags["deepclick.metric.auc"]) == pytest.approx(0.7)

    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(model), "ranker")
    third = registry.register("ranker", run, "ranker", {})
    refused = append_decision(
        Settings(root=tmp_path), _decision("2024-01-03", REFUSED, "v3", towers=False)
    )
    registry.record(refused)
    assert registry.alias("ranker", CHAMPION) == "2"  # a refusal moves nothing
    assert registry.alias("ranker", CHALLENGER) == third
    assert client.get_model_version("deepclick-ranker", third).tags["deepclick.decision"] == REFUSED


# --------------------------------------------------------------------------- uncertainty (issue 10)

WITH_CI = {
    **GOOD,
    "auc_ci_low": 0.68,
    "auc_ci_high": 0.72,
    "calibration_ci_low": 0.95,
    "calibration_ci_high": 1.09,
    "eval_clicks": 800.0,
}


def test_every_check_passes_on_its_interval_and_the_verdict_is_promote() -> None:
    result = judge(WITH_CI, None, GATES)
    assert result.promote and result.verdict == "promote"
    assert result.to_dict()["verdict"] == "promote"


def test_an_auc_interval_across_the_floor_is_insufficient_evidence_not_a_refusal() -> None:
    shaky = {**WITH_CI, "auc": 0.61, "auc_ci_low": 0.58, "auc_ci_high": 0.64}  # floor 0.6
    result = judge(shaky, dict(shaky), GATES)
    assert result.verdict == "insufficient_evidence" and not result.promote
    assert result.reason.startswith("insufficient evidence: keep the champion")
    below = {**WITH_CI, "auc": 0.57, "auc_ci_low": 0.55, "auc_ci_high": 0.59}
    assert judge(below, None, GATES).verdict == "refuse"


def test_with_no_champion_insufficient_evidence_still_promotes_the_first_model() -> None:
    few = {**WITH_CI, "eval_clicks": 40.0}
    result = judge(few, None, GATES)
    assert result.verdict == "insufficient_evidence" and result.promote
    assert "fewer than gate_min_clicks 100" in result.reason
    assert "promoted, as no champion serves" in result.reason


def test_too_few_clicks_keeps_the_champion_whatever_the_numbers() -> None:
    few = {**WITH_CI, "eval_clicks": 40.0, "auc": 0.9, "auc_ci_low": 0.85, "auc_ci_high": 0.95}
    result = judge(few, {**WITH_CI, "auc": 0.7}, GATES)
    assert result.verdict == "insufficient_evidence" and not result.promote


def test_the_calibration_bound_comes_from_the_interval_of_the_click_count() -> None:
    # ratio 1.15 is outside the fixed [0.9, 1.1], but 30 clicks cannot tell: the interval reaches
    small = {
        **WITH_CI,
        "calibration_ratio": 1.15,
        "calibration_ci_low": 0.8,
        "calibration_ci_high": 1.7,
    }
    assert judge(small, None, GATES).promote
    # the same ratio on many clicks is a refusal
    big = {
        **WITH_CI,
        "calibration_ratio": 1.15,
        "calibration_ci_low": 1.12,
        "calibration_ci_high": 1.18,
    }
    result = judge(big, None, GATES)
    assert result.verdict == "refuse" and failed(result) == {"calibration_ratio"}


def test_the_gate_refuses_a_ranker_worse_than_the_best_peer_beyond_the_interval() -> None:
    worse = {
        **WITH_CI,
        "best_peer_auc": 0.73,
        "auc_vs_best_peer": -0.03,
        "auc_vs_best_peer_ci_low": -0.04,
        "auc_vs_best_peer_ci_high": -0.02,
    }
    result = judge(worse, None, GATES)
    assert result.verdict == "refuse" and failed(result) == {"auc_vs_best_peer"}
    assert "worse than a peer beyond the CI" in result.reason
    tied = {**worse, "auc_vs_best_peer_ci_high": 0.005}
    assert judge(tied, None, GATES).promote
    off = GATES.model_copy(update={"gate_peers": False})
    assert judge(worse, None, off).promote


def test_a_champion_comparison_wider_than_the_tolerance_is_insufficient_evidence() -> None:
    champion = {**WITH_CI, "auc": 0.70}
    # challenger 0.005 below, but each AUC ±0.02: the difference's interval exceeds tolerance 0.01
    result = judge({**WITH_CI, "auc": 0.695}, champion, GATES)
    assert result.verdict == "insufficient_evidence" and not result.promote
    check = next(c for c in result.checks if c.name == "auc_vs_champion")
    assert check.undecided
    # a clear win passes, a clear loss refuses
    won = {**WITH_CI, "auc": 0.76, "auc_ci_low": 0.75, "auc_ci_high": 0.77}
    assert judge(won, champion, GATES).promote
    lost = {**WITH_CI, "auc": 0.62, "auc_ci_low": 0.61, "auc_ci_high": 0.63}
    assert failed(judge(lost, champion, GATES)) == {"auc_vs_champion"}
