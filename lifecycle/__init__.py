"""The daily lifecycle (DESIGN.md, dependency rules, layer 4).

It holds the stage table and its wiring, the run ledger, the gate, the model registry, tracking and
release writing. It sits above ``pipelines/`` (pure Spark and training stages) and ``serving/``
(loads and serves releases), which it composes into one day's run; only the entry points
(``deepclick_cli/``, ``airflow_dags/``) import it.
"""
