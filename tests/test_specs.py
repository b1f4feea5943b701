"""Dataset specs: built-ins load, and every way a spec can be wrong gives an error naming it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipelines.specs import (
    BUILTIN_DIR,
    UNKNOWN_KEY,
    SpecError,
    builtin_specs,
    load_spec,
    parse_spec,
)


def _raw(name: str) -> dict:
    return yaml.safe_load((BUILTIN_DIR / f"{name}.yaml").read_text())


def test_builtin_specs_cover_the_designed_layouts() -> None:
    assert {"marketplace", "avazu", "taobao", "open_bandit"} <= set(builtin_specs())
    for name in builtin_specs():
        assert load_spec(name).name == name


def test_log_without_user_id_is_describable_by_key_columns() -> None:
    spec = load_spec("avazu")
    assert spec.user.id is None
    assert spec.user.key_columns == ["device_id", "device_ip", "device_model"]


def test_event_features_are_role_prefixed_and_include_time_context() -> None:
    names = {f["name"]: f for f in load_spec("avazu").event_features()}
    assert names["ctx__hour"]["role"] == "context"
    assert names["ad__C15"]["role"] == "ad" and names["ad__C15"]["kind"] == "categorical"
    assert names["user__device_type"]["role"] == "user"
    price = {f["name"]: f for f in load_spec("marketplace").table_features("ads")}["ad__price"]
    assert price["kind"] == "numeric" and price["log1p"] is True and price["dtype"] == "double"


def test_missing_column_for_a_role_is_named() -> None:
    raw = _raw("avazu")
    raw["ad"]["features"]["C99"] = "categorical"
    with pytest.raises(SpecError, match=r"'avazu'.*column 'C99' named for role ad.features"):
        parse_spec(raw)


def test_unknown_role_is_named() -> None:
    raw = _raw("taobao")
    raw["publisher"] = {"id": "pid"}
    with pytest.raises(SpecError, match=r"unknown key 'publisher'"):
        parse_spec(raw)


def test_side_table_key_must_be_a_declared_column() -> None:
    raw = copy.deepcopy(_raw("taobao"))
    raw["tables"]["ads"]["key"] = "ad_key"
    with pytest.raises(SpecError, match=r"'ad_key' named for tables.ads.key"):
        parse_spec(raw)


def test_role_needs_exactly_one_of_id_or_key_from() -> None:
    raw = _raw("taobao")
    raw["user"] = {"features": {}}
    with pytest.raises(SpecError, match=r"user: give exactly one of 'id' or 'key_from'"):
        parse_spec(raw)


def test_unknown_spec_name_lists_the_builtins(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown dataset spec 'criteo'.*avazu"):
        load_spec("criteo")
    with pytest.raises(SpecError, match=r"does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_builtin_specs_include_the_public_layouts_as_they_ship() -> None:
    """Issue 11 item 3: obp's all.csv (and a copy renamed bts_all.csv); TalkingData's layout."""
    bandit = load_spec("open_bandit")
    assert Path("all.csv").match(bandit.events.file) and Path("bts_all.csv").match(
        bandit.events.file
    )
    talking = load_spec("talkingdata")
    assert talking.label.column == "is_attributed" and not talking.drop_duplicates
    assert "attributed_time" not in talking.events.columns  # it only exists for installs


def test_event_time_is_declared_exactly_one_way() -> None:
    raw = _raw("taobao")
    raw["event_time"] = {"column": "time_stamp", "start": "2024-01-01", "rows_per_day": 10}
    with pytest.raises(SpecError, match=r"exactly one of .*given: column, start \+ rows_per_day"):
        parse_spec(raw)
    raw["event_time"] = {"date_column": "time_stamp"}
    with pytest.raises(SpecError, match=r"'date_column' and 'hour_column' go together"):
        parse_spec(raw)
    raw["event_time"] = {"date_column": "time_stamp", "hour_column": "hr"}
    with pytest.raises(SpecError, match=r"column 'hr' named for role event_time"):
        parse_spec(raw)


def test_label_mapping_is_positive_values_or_a_threshold() -> None:
    raw = _raw("taobao")
    raw["label"] = {"column": "clk", "positive": ["1"], "negative": ["-1"], "threshold": 0.5}
    with pytest.raises(SpecError, match=r"either 'threshold' or 'positive'/'negative'"):
        parse_spec(raw)
    raw["label"] = {"column": "clk", "positive": ["1"], "negative": ["1", "0"]}
    with pytest.raises(SpecError, match=r"\['1'\] are both positive and negative"):
        parse_spec(raw)
    raw["label"] = {"column": "clk", "positve": ["yes"]}
    with pytest.raises(SpecError, match=r"unknown key 'label.positve'"):
        parse_spec(raw)


def test_empty_key_policy_shorthands() -> None:
    raw = _raw("taobao")
    raw["user"] = {"id": "user", "missing": "unknown"}
    assert parse_spec(raw).user.missing.value == UNKNOWN_KEY
    raw["user"] = {"id": "user", "missing": {"value": "anon"}}
    assert parse_spec(raw).user.missing.action == "value"
    raw["user"] = {"id": "user", "missing": {"action": "value"}}
    with pytest.raises(SpecError, match=r"user.missing: 'value' is the non-empty key"):
        parse_spec(raw)
    raw["user"] = {"id": "user", "missing": "drop"}
    with pytest.raises(SpecError, match=r"user.missing"):
        parse_spec(raw)


def test_duplicate_policy_defaults_to_dropping_only_with_an_event_id() -> None:
    assert load_spec("marketplace").drop_duplicates  # has impression_id
    assert load_spec("taobao").drop_duplicates  # declared: drop_exact
    raw = _raw("taobao")
    del raw["duplicates"]
    assert not parse_spec(raw).drop_duplicates
