"""The spark-submit driver of the cluster DAG: one stage of D's run, as ``deepclick run`` runs it.

``deepclick_daily_cluster`` hands this file to ``spark-submit`` (``lifecycle.daily.
spark_submit_options`` names it as the application) with ``--stage S --date D --run-key K``. It
is an entry point like the CLI: it loads the settings, then calls :func:`lifecycle.daily.run_stage`
— the ledger, the fingerprint skip, the tracker and the serving guard of every other way of
running a stage. The Airflow task then judges the stage by its ledger entry, not by this
process's exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deepclick.settings import load_settings
from lifecycle.daily import run_stage
from lifecycle.stages import STAGE_NAMES


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage: the application the cluster DAG hands to spark-submit."""
    parser = argparse.ArgumentParser(prog="deepclick_cli/spark_stage.py", description=main.__doc__)
    parser.add_argument("--stage", required=True, choices=STAGE_NAMES)
    parser.add_argument("--date", required=True, help="day D, YYYY-MM-DD")
    parser.add_argument("--run-key", required=True, help="the Airflow run id")
    parser.add_argument("--config", default=None, help="settings YAML (default $DEEPCLICK_CONFIG)")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--source", default=None)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    run_stage(
        settings,
        args.date,
        args.stage,
        run_key=args.run_key,
        dataset=args.dataset,
        source=args.source,
    )
    return 0


if __name__ == "__main__":  # spark-submit runs this file as a script
    sys.exit(main())
