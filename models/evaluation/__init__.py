"""Offline evaluation: pure metrics, plots and reports over exported models and evaluation sets."""
