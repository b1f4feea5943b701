"""Spark ingest: raw logs → validated canonical events (DESIGN.md, first box)."""
