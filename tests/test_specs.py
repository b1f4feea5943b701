"""Dataset specs: built-ins load, and every way a spec can be wrong gives an error naming it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipelines.specs import BUILTIN_DIR, SpecError, builtin_specs, load_spec, parse_spec


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
