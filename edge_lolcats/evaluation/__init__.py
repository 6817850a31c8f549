"""Evaluation of a linearization against its teacher and fixed-memory baselines (evaluate.py)."""
