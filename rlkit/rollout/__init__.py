"""Rollout engines (hf, ...) and rollout strategies (single, ...)."""
from . import hf, strategies  # noqa: F401  (register plugins)
from .base import Completion, RolloutEngine, SamplingParams  # noqa: F401
