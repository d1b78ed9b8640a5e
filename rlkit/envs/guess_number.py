"""``guess_number``: a toy multi-turn environment for CI (no chat template needed).

The dataset row's ``answer`` column is the secret (an integer in ``[low, high]``).  Each model turn is
read for its first integer: the observation is ``"higher:"`` or ``"lower:"`` (plain text, so the
character-level toy tokenizer can spell it), ``"bad:"`` when the turn holds no number.  Per-turn reward
``format_reward`` for a turn that holds a number; final reward 1 when the secret was guessed (the
episode then ends), else 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..registry import register_environment
from .base import Environment, StepResult

_INT = re.compile(r"-?\d+")


@register_environment("guess_number")
class GuessNumber(Environment):
    @dataclass
    class Params:
        low: int = 0
        high: int = 9
        format_reward: float = 0.1
        secret_field: str = "answer"

    def reset(self, row: Dict[str, Any]) -> Dict[str, Any]:
        secret = row.get(self.params.secret_field)
        try:
            secret = int(str(secret).strip())
        except ValueError:
            raise ValueError(f"guess_number: column {self.params.secret_field!r} must hold an integer, got {secret!r}") from None
        return {"secret": secret, "solved": False}

    def step(self, state, text: str) -> StepResult:
        m = _INT.search(text)
        if m is None:
            return StepResult(observation="bad:")
        guess = int(m.group())
        if guess == state["secret"]:
            state["solved"] = True
            return StepResult(reward=self.params.format_reward, done=True)
        return StepResult(observation="higher:" if guess < state["secret"] else "lower:", reward=self.params.format_reward)

    def final_reward(self, state) -> Optional[float]:
        return 1.0 if state["solved"] else 0.0


def guess_rows(n: int, seed: int = 0, low: int = 0, high: int = 9):
    """Rows ``{"question": "guess:", "answer": "<secret>"}`` for the toy recipe and tests."""
    import random

    rng = random.Random(seed)
    return [{"question": "guess:", "answer": str(rng.randint(low, high))} for _ in range(n)]
