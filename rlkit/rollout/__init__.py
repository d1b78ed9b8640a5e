"""Rollout engines (hf, vllm) and rollout strategies (single, ...)."""
from . import hf, strategies, vllm_engine  # noqa: F401  (register plugins; vllm itself is imported lazily)
from .base import Completion, RolloutEngine, SamplingParams  # noqa: F401
