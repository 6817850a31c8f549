"""Every benchmark in one place; ``edge-lolcats bench ...`` runs them, docs/BENCHMARKS.md records
what they measured. runtime.py is torch-free: its workers measure the runtime as a user runs it.
This package imports nothing at import time."""
