"""Popular ads, overall and per placement: the non-personal half of candidate selection.

Nearest-neighbour search finds ads that match a user; a small quota of ads that are popular on the
placement keeps proven ads in every candidate set and gives unknown users something sensible. The
index build ranks them from click counts (features stage, contracts §3 ``popularity``) and stores
them as ``popular.json`` in the index folder (contracts §5); serving only reads that file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepclick.errors import DeepclickError

GLOBAL = "__all__"
"""The placement id that the features stage uses for counts over all placements."""


class PopularFileError(DeepclickError, ValueError):
    """popular.json does not have the contracts §5 shape."""


@dataclass(frozen=True)
class PopularAds:
    """Most-clicked ads first, overall and per placement."""

    global_ads: tuple[str, ...] = ()
    by_placement: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def for_placement(self, placement_id: str | None) -> tuple[str, ...]:
        """The placement's own list when it has one, else the overall list (new placements)."""
        own = self.by_placement.get(placement_id, ()) if placement_id is not None else ()
        return own or self.global_ads

    def to_json(self) -> dict[str, Any]:
        return {
            "global": list(self.global_ads),
            "by_placement": {p: list(ads) for p, ads in sorted(self.by_placement.items())},
        }


def rank_popular(
    rows: Iterable[tuple[str, str, float]],
    *,
    top_n: int,
    keep: Callable[[str], bool] | None = None,
) -> PopularAds:
    """Rank ads by clicks from ``(placement_id, ad_id, clicks)`` rows, keeping ``top_n`` per list.

    Rows with placement ``__all__`` give the overall list; without them it sums the per-placement
    clicks. ``keep`` drops ads the index cannot serve (e.g. no longer in the catalogue). Ties break
    by ad id so rebuilds are identical.
    """
    clicks: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for placement_id, ad_id, count in rows:
        if keep is None or keep(str(ad_id)):
            clicks[str(placement_id)][str(ad_id)] += float(count)
    if GLOBAL not in clicks:
        for ads in list(clicks.values()):
            for ad_id, count in ads.items():
                clicks[GLOBAL][ad_id] += count

    def top(ads: Mapping[str, float]) -> tuple[str, ...]:
        ranked = sorted(ads.items(), key=lambda item: (-item[1], item[0]))
        return tuple(ad_id for ad_id, count in ranked[:top_n] if count > 0)

    return PopularAds(
        global_ads=top(clicks.get(GLOBAL, {})),
        by_placement={p: top(ads) for p, ads in clicks.items() if p != GLOBAL},
    )


def write_popular(path: Path, popular: PopularAds) -> None:
    path.write_text(json.dumps(popular.to_json(), indent=1))


def read_popular(path: Path) -> PopularAds:
    """Read popular.json, refusing anything but ``{"global": [...], "by_placement": {...}}``."""
    if not path.is_file():
        raise PopularFileError(f"{path} is missing (contracts §5 lists it)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PopularFileError(f"{path} is not valid JSON: {exc}") from None
    global_ads = data.get("global") if isinstance(data, dict) else None
    by_placement = data.get("by_placement") if isinstance(data, dict) else None
    if not isinstance(global_ads, list) or not isinstance(by_placement, dict):
        raise PopularFileError(
            f'{path} must be {{"global": [ad ids], "by_placement": {{placement_id: [ad ids]}}}}'
        )
    return PopularAds(
        tuple(str(a) for a in global_ads),
        {str(p): tuple(str(a) for a in ads) for p, ads in by_placement.items()},
    )
