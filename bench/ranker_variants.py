"""Ranker variants on the command line: ``name:key=value,...`` → a ``RankerSettings`` copy.

Shared by ``bench/ranker_split.py`` and ``bench/slate_gap.py`` so a variant means the same in both.
Values take the type of the setting they replace: ``1``/``true`` for booleans, ``/``-separated
lists (``hidden_units=64/32``, ``crosses=cms_segid*cate_id/page_type*brand``), ``crosses=world``
for :data:`deepclick.settings.MARKETPLACE_CROSSES` and ``crosses=none`` for no crosses;
``/``-separated ``key:value`` pairs for mappings (``wide_prior_scale=ad_id:2/user_id:1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepclick.settings import MARKETPLACE_CROSSES, RankerSettings

PRESETS: dict[str, list[str]] = {"world": list(MARKETPLACE_CROSSES), "none": []}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,...`` → ``(name, {key: value})``."""
    name, _, rest = text.partition(":")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def _list(value: str) -> list[Any]:
    if value in PRESETS:
        return PRESETS[value]
    items = [v for v in value.split("/") if v]
    try:
        return [int(v) for v in items]
    except ValueError:
        return items


def ranker_settings(base: RankerSettings, pairs: Mapping[str, str]) -> RankerSettings:
    """``base`` with each ``key=value`` of ``pairs`` applied (validated by the settings model).

    Raises:
        ValueError: a key that is not a ranker setting (the message lists them).
    """
    update: dict[str, Any] = {}
    for key, value in pairs.items():
        if key not in RankerSettings.model_fields:
            raise ValueError(
                f"variant key {key!r} is not a ranker setting; use one of "
                f"{', '.join(RankerSettings.model_fields)}"
            )
        current = getattr(base, key)
        if isinstance(current, bool):
            update[key] = value in ("1", "true")
        elif isinstance(current, list):
            update[key] = _list(value)
        elif isinstance(current, dict):
            update[key] = dict(item.split(":", 1) for item in value.split("/") if item)
        else:
            update[key] = type(current)(value)
    return RankerSettings.model_validate({**base.model_dump(), **update})
