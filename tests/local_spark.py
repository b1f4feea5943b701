"""Spark configuration for the suite's tiny local data (never for production runs).

On a few thousand rows a Spark job costs its fixed overheads, not its data: JIT compilation of the
JVM, whole-stage code generation of every new query shape, and adaptive re-planning after each
shuffle. The C1-only JIT tier starts the JVM faster; interpreted stages and no adaptive execution
cut the features stage's CPU by about 15% (measured on test_daily's world, day 3: 60.5 -> 51.1 s
cold, 34.0 -> 28.0 s warm, under load). Results are the same: only how Spark executes changes.
"""

from __future__ import annotations

import json

JIT_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m"

FAST_LOCAL_CONF = {
    "spark.driver.extraJavaOptions": JIT_OPTIONS,
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.codegen.wholeStage": "false",
}


def fast_local_env() -> dict[str, str]:
    """The same configuration for a ``deepclick`` subprocess, through its settings' environment."""
    return {"DEEPCLICK_SPARK__EXTRA_CONF": json.dumps(FAST_LOCAL_CONF)}
