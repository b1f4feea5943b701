"""D's model quality as console tables: the ranker beside its peers, and the replay's slates.

Shared by ``deepclick evaluate`` / ``deepclick replay``, the demo and ``bench/quality``, so every
one of them shows the same columns: AUC with its interval, calibration with the interval from
the click count; expected CTR of the top-1/5/10 slate, share of the oracle, multiple of
popularity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table


def models_table(title: str, metrics: Mapping[str, Any]) -> Table:
    """One row per model (ranker, peers, oracle): AUC with its interval, logloss, NE and the
    calibration ratio with the interval from the click count."""

    def span(values: Any, digits: int) -> str:
        return f"{values[0]:.{digits}f}–{values[1]:.{digits}f}" if values else "—"

    rows = dict(metrics["models"])
    if "oracle" in metrics:
        rows["oracle (true p)"] = metrics["oracle"]
    cells = [
        [
            name,
            f"{m['auc']:.4f}",
            span(m.get("auc_ci95"), 3),
            f"{m['logloss']:.4f}",
            f"{m['normalized_entropy']:.4f}",
            f"{m['calibration_ratio']:.3f}",
            span(m.get("calibration_ci95"), 2),
        ]
        for name, m in rows.items()
    ]
    # the numbers never shrink (an elided interval says nothing): a narrow terminal folds the
    # model names instead; a light box leaves them the room of the borders
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    headers = ("model", "AUC", "AUC 95% CI", "logloss", "NE", "calib.", "calib. CI")
    for i, header in enumerate(headers):
        if i == 0:
            table.add_column(header, overflow="fold", min_width=8)
        else:
            widest = max([len(header), *(len(row[i]) for row in cells)])
            table.add_column(header, justify="right", no_wrap=True, min_width=widest)
    for row in cells:
        table.add_row(*row)
    data = metrics["evaluation_set"]
    table.caption = f"{data['rows']:,} rows, {data['clicks']:,} clicks"
    return table


def replay_tables(title: str, report: Mapping[str, Any]) -> list[Table]:
    """The replay's table: expected CTR of the top-1/5/10 slate per system, share of the oracle
    and multiple of popularity with their intervals; or the funnel recall without a truth."""
    tables = []
    if report.get("systems"):
        table = Table(title=title, title_justify="left")
        for column in ("system", "top-1", "top-5", "top-10", "of oracle", "× popularity"):
            table.add_column(column, justify="right")
        for name, entry in report["systems"].items():
            ratios = []
            for key in ("share_of_oracle", "x_popularity"):
                top = entry["top_10"]
                ci = top.get(f"{key}_ci95")
                ratios.append(
                    "—"
                    if key not in top
                    else f"{top[key]:.3f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")
                )
            table.add_row(
                name,
                *(f"{entry[f'top_{k}']['expected_ctr']:.4f}" for k in (1, 5, 10)),
                *ratios,
            )
        table.caption = f"{report['requests']:,} requests; expected CTR from the true p"
        tables.append(table)
    funnel = report.get("funnel_recall")
    if funnel:
        table = Table(
            title=f"funnel recall of {funnel['clicks']:,} clicks of the day (served candidates)",
            title_justify="left",
        )
        for k in funnel["recall_at_k"]:
            table.add_column(f"recall@{k}", justify="right")
        table.add_row(*(f"{v:.4f}" for v in funnel["recall_at_k"].values()))
        tables.append(table)
    return tables
