"""Registers the engine-run fixtures (defined with their helpers in engine_runs.py)."""
from engine_runs import base_runs, cache_dir  # noqa: F401  pylint: disable=unused-import
