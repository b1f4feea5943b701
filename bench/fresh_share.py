"""Choose ``index.fresh_share``: rebuild a state's index with each share and read its funnel check.

The fresh slots are the new ads' way in (``candidates/funnel.py``). What a share buys is the
clicks on D's new ads that the fresh slots find; what it costs is the list's other clicks, read
against as many most clicked ads. Each share's index is built by the daily run's own code
(``pipelines.build_index.run_index``, serving's candidate path, every clicked impression of D
unless ``--clicks``) into a temporary folder, never published; the state is only read. Usage (a
state where the daily run for D has published features and embeddings)::

    python -m bench.fresh_share --root var/bench-quality/medium --date 2024-01-08 \
        --share 0 0.02 0.05 0.1
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json
from deepclick.layout import embeddings_dir, features_dir, version_for
from deepclick.publish import read_manifest, resolve
from deepclick.settings import Settings
from pipelines.build_index import run_index

ALL_CLICKS = 10**9


def measure(root: Path, date: dt.date, share: float, clicks: int, out: Path) -> dict[str, Any]:
    """The funnel check of D's index rebuilt with ``share`` (never refused: the numbers are the
    point), as the manifest records it."""
    base = Settings(root=root)
    settings = base.model_copy(
        update={
            "index": base.index.model_copy(update={"fresh_share": share, "funnel_refuse": False}),
            "lifecycle": base.lifecycle.model_copy(update={"recall_queries": clicks}),
        }
    )
    version = version_for(date)
    folder = run_index(
        settings,
        date,
        embeddings=resolve(embeddings_dir(root), version, what="embeddings"),
        features=resolve(features_dir(root), version, what="features"),
        out=out / version,
    )
    funnel = read_manifest(folder)["funnel"]
    return {"fresh_ads": funnel.get("fresh_ads", 0), **funnel["check"]}


def rows_of(share: float, check: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per K: the new-ad clicks found, and the whole list and the judged part
    against popularity with the paired standard error."""
    fresh = check.get("fresh", {})
    judged = check.get("judged", {})
    rows = []
    for k, recall in check["recall"].items():
        found = fresh.get("recall", {}).get(k, 0.0)
        rows.append(
            {
                "fresh_share": share,
                "K": int(k),
                "new_ad_clicks_found": f"{round(found * fresh.get('clicks', 0))}"
                f"/{fresh.get('clicks', 0)}",
                "whole_minus_popularity": round(recall - check["popularity"][k], 4),
                "judged_minus_popularity": round(
                    judged.get(k, {}).get("candidates", recall)
                    - judged.get(k, {}).get("popularity", check["popularity"][k]),
                    4,
                ),
                "paired_se": check["difference_se"][k],
                "decision": check["decision"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="state folder")
    parser.add_argument("--date", required=True, help="D, YYYY-MM-DD")
    parser.add_argument("--share", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument("--clicks", type=int, default=ALL_CLICKS, help="sample of D's clicks")
    parser.add_argument("--out", default="fresh_share", help="name under bench/results/")
    args = parser.parse_args(argv)
    date = dt.date.fromisoformat(args.date)
    checks: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fresh-share-") as tmp:
        for share in args.share:
            check = measure(args.root, date, share, args.clicks, Path(tmp) / f"share-{share}")
            checks[str(share)] = check
            rows += rows_of(share, check)
    first = next(iter(checks.values()))
    on_new = first.get("fresh", {}).get("clicks", 0)
    clicks = f"{first['clicks']} clicks, {on_new} on {first['fresh_ads']} new ads"
    title = f"fresh share on {date} ({clicks})"
    print_table(title, rows)
    path = write_json(args.out, {"root": str(args.root), "date": args.date, "checks": checks})
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
