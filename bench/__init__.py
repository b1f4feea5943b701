"""Benchmarks: ``python -m bench.<name>`` measures one DESIGN.md target and records the numbers."""
