"""Rollout-engine interface.

An engine turns token-id prompts into sampled completions with per-token
log-probs.  Prompts may end in part of a response: SPO and tree methods pass
``prompt + response[:c]`` and get continuations (the prefix API).

Log-prob convention (all engines): the log-prob of each sampled token under
``softmax(logits / temperature)``, *before* top-p / top-k truncation (and
``log_softmax(logits)`` for greedy).  The trainer recomputes exactly this
quantity, so the rollout-vs-trainer gap is 0 up to numerics when the weights
agree; a large gap means the engine's weights are stale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else self.temperature


@dataclass
class Completion:
    token_ids: List[int]            # generated tokens (including EOS if generated)
    logprobs: List[float]           # one per token
    finish_reason: str              # "stop" (EOS or stop string) | "length" (truncated)
    text: str


class RolloutEngine:
    """Base class.  ``generate`` returns, for each prompt, ``n`` completions."""

    name = "base"

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> List[List[Completion]]:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Push the trainer's weights into the engine (no-op when they share a model)."""

    def sleep(self) -> None:
        """Free generation memory while the trainer runs (no-op where unsupported)."""

    def wake_up(self) -> None:
        pass
