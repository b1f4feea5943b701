"""Tiny raw logs in foreign layouts (taobao, avazu, open bandit), written by the tests themselves.

Each builder returns the planted facts a test checks against, so assertions never restate code.
"""

from __future__ import annotations

import csv
from pathlib import Path

# 2017-05-09 00:00:00 UTC; Asia/Shanghai is UTC+8.
DAY_START = 1494288000
TAOBAO_HEADER = ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"]


def write_csv(path: Path, header: list[str], rows: list[list[str]] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            if isinstance(row, str):  # a raw line, written as is (e.g. a short line)
                handle.write(row + "\n")
            else:
                writer.writerow(row)
    return path


def taobao_source(folder: Path) -> dict[str, object]:
    """Ten good impressions of 2017-05-09 plus one of each planted fault."""
    good = [
        [
            f"u{i % 4}",
            str(DAY_START + 3600 * i),
            f"ad{i % 3}",
            "pid_a" if i % 2 else "pid_b",
            str(1 - (i % 5 == 0)),
            str(int(i % 5 == 0)),
        ]
        for i in range(10)
    ]
    bad = [
        ["u1", str(DAY_START + 100), "ad1", "pid_a", "1", "2"],  # label 2
        ["", str(DAY_START + 200), "ad1", "pid_a", "1", "0"],  # missing user id
        ["u1", "yesterday", "ad1", "pid_a", "1", "0"],  # unparseable time
        ["u1", str(DAY_START + 300), "ad1", "pid_a", "one", "0"],  # wrong type (nonclk int)
        f"u1,{DAY_START + 400},ad1",  # short line
    ]
    duplicate = good[3]
    other_day = ["u1", str(DAY_START + 86400 + 5), "ad1", "pid_a", "1", "0"]
    write_csv(folder / "raw_sample.csv", TAOBAO_HEADER, [*good, *bad, duplicate, other_day])
    write_csv(
        folder / "ad_feature.csv",
        ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"],
        [
            ["ad0", "c1", "k1", "v1", "b1", "10.5"],
            ["ad1", "c2", "k1", "v1", "NULL", "3"],
            ["ad2", "c1", "k2", "v2", "b2", "99"],
            ["ad9", "c3", "k3", "v3", "b3", "cheap"],
        ],
    )
    write_csv(
        folder / "user_profile.csv",
        [
            "userid",
            "cms_segid",
            "cms_group_id",
            "final_gender_code",
            "age_level",
            "pvalue_level",
            "shopping_level",
            "occupation",
            "new_user_class_level",
        ],
        [[f"u{i}", "0", str(i), "1", "3", "", "2", "0", "1"] for i in range(4)],
    )
    return {
        "date": "2017-05-09",
        "good": len(good),
        "clicks": sum(int(r[5]) for r in good),
        "reasons": {
            "label 'clk' is not 0 or 1: '2'": 1,
            "missing user key 'user'": 1,
            "event time 'time_stamp' does not parse as unix_seconds: 'yesterday'": 1,
            "column 'nonclk' is not a int: 'one'": 1,
            "malformed line: wrong number of columns": 1,
        },
        "duplicates": 1,
        "other_dates": {"2017-05-10": 1},
        "side_quarantined": 1,  # ad9's price
        "rows_in": len(good) + len(bad) + 2,
    }


AVAZU_HEADER = [
    "id",
    "click",
    "hour",
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]


def avazu_source(folder: Path) -> dict[str, object]:
    """Six rows of 2014-10-21 in the Avazu layout: two devices, two sites, hour 14102105."""
    rows = []
    for i in range(6):
        device = ("d1", "ip1", "m1") if i < 4 else ("d2", "ip2", "m2")
        site = ("s1", "sd1", "cat1") if i % 2 == 0 else ("s2", "sd2", "cat2")
        rows.append(
            [
                str(1000 + i),
                str(int(i == 0)),
                "14102105",
                "1005",
                "0",
                *site,
                "app0",
                "ad0",
                "ac0",
                *device,
                "1",
                "0",
                f"{15700 + i % 3}",
                "320",
                "50",
                "1722",
                "0",
                "35",
                "-1",
                "79",
            ]
        )
    write_csv(folder / "avazu_sample.csv", AVAZU_HEADER, rows)
    return {"date": "2014-10-21", "rows": 6, "users": 2, "placements": 2, "ads": 3, "hour": "5"}


def open_bandit_source(folder: Path) -> dict[str, object]:
    """Four logged recommendations in the Open Bandit layout (unnamed index, ISO times)."""
    header = [
        "",
        "timestamp",
        "item_id",
        "position",
        "click",
        "propensity_score",
        "user_feature_0",
        "user_feature_1",
        "user_feature_2",
        "user_feature_3",
        "user-item_affinity_0",
    ]
    rows = [
        [
            str(i),
            f"2019-11-24 0{i}:00:17.004101+00:00",
            str(i % 2),
            str(1 + i % 3),
            str(int(i == 2)),
            "0.1",
            "f0",
            "g0" if i < 2 else "g1",
            "h0",
            "k0",
            "0.0",
        ]
        for i in range(4)
    ]
    write_csv(folder / "all.csv", header, rows)  # obp's obd/<policy>/<campaign>/all.csv
    write_csv(
        folder / "item_context.csv",
        ["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"],
        [["0", "0", "-0.5", "a", "b", "c"], ["1", "1", "0.25", "a", "b2", "c"]],
    )
    return {"date": "2019-11-24", "rows": 4, "users": 2, "placements": 3}
