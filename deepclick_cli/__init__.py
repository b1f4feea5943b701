"""The ``deepclick`` command line (DESIGN.md, dependency rules, layer 5).

An entry point: it loads the settings once and hands them to the lifecycle, pipelines and serving;
nothing else imports it.
"""
