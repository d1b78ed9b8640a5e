"""Length-budget curriculum ("Train Long, Think Short", Hammoud et al., arXiv 2508.08940).

GRPO with a token budget that shrinks during training.  The reward adds a triangular
length term (``length_budget``, ``rewards/length_budget.py``) whose peak is the
current budget B(t); the controller ``length_budget`` sets B(t) before every step:

    exponential (the paper's main schedule):  B(t) = max(1, int(B0 * gamma ** (t // T)))
        B0 = 256, gamma = 0.7, T = 150, 600 steps: 256 -> 179 -> 125 -> 87
        (the reported integers imply truncation to int: [INFERRED])
    geometric (step-wise alternative):        S_k = S0 * d**k,  d = (S_f / S0) ** (1 / n)
    linear (n equal drops; better hard-task accuracy in the paper, 60.0 vs 57.9 avg):
                                              S_k = S0 - k * (S0 - S_f) / n
        for both: k = min(n, t // (total_steps / (n + 1))), i.e. a drop every total/(n+1) steps.

``t`` is the number of completed steps (0 for the first step).  The budget is a pure
function of ``t``, so a resumed run gets the right budget without extra state.

How the budget reaches the reward: before each step the controller binds
``budget=B(t)`` as a keyword argument of every ``reward.functions`` entry named
``reward`` (default ``length_budget``), the way a recipe binds parameters.  With
``prompt_template`` (e.g. ``"{prompt}\\nUse exactly {budget} tokens."``) the budget is
also written into every training (and evaluation) prompt, re-tokenized when it changes.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..plugins import Controller
from ..registry import register_controller

log = logging.getLogger("rlkit")

SCHEDULES = ("exponential", "geometric", "linear")


def exponential_budget(t: int, initial: int = 256, decay: float = 0.7, period: int = 150) -> int:
    """B(t) = max(1, int(B0 * gamma ** floor(t / T)))."""
    return max(1, int(initial * decay ** (int(t) // int(period))))


def stepwise_budget(t: int, total_steps: int, initial: int, final: int, num_drops: int = 3, kind: str = "geometric") -> int:
    """n drops from ``initial`` to ``final``, one every ``total_steps / (n + 1)`` steps; geometric
    (S0 * d**k, d = (S_f/S0)**(1/n)) or linear (equal decrements)."""
    n = max(1, int(num_drops))
    k = min(n, int(t // (max(1, total_steps) / (n + 1))))
    if kind == "geometric":
        value = initial * (final / initial) ** (k / n)
    elif kind == "linear":
        value = initial - k * (initial - final) / n
    else:
        raise ValueError(f"length_budget: unknown step schedule {kind!r}")
    return max(1, int(value + 1e-9))  # + 1e-9: 256 * (87/256)**1 must give 87, not 86


def bind_reward_kwargs(rewarder: Any, name: str, **kwargs: Any) -> int:
    """Bind keyword arguments into every reward function called ``name`` (or ``name_2``, ... for repeated
    entries) of a :class:`rlkit.rewarding.Rewarder` (or the trainer's timing wrapper around one).
    Returns how many functions were bound."""
    r = getattr(rewarder, "rewarder", rewarder)
    hits = 0
    for rf in getattr(r, "functions", []):
        if rf.name == name or re.fullmatch(re.escape(name) + r"_\d+", rf.name):
            fn = rf.fn
            base, bound = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
            rf.fn = functools.partial(base, **{**bound, **kwargs})
            hits += 1
    return hits


def _names_in(functions: List[Any]) -> List[str]:
    out = []
    for spec in functions:
        target = spec.get("name", spec.get("path")) if isinstance(spec, dict) else spec
        if isinstance(target, str):
            out.append(target.rsplit(":", 1)[-1])
    return out


@register_controller("length_budget")
class LengthBudgetController(Controller):
    """Sets the token budget B(t) of the length_budget reward (and optionally of the prompt) before each step."""

    @dataclass
    class Params:
        initial_budget: int = 256                 # B0
        decay: float = 0.7                        # gamma (exponential)
        period: int = 150                         # T: steps between decays (exponential)
        schedule: str = "exponential"             # exponential | geometric | linear
        final_budget: Optional[int] = None        # S_f (geometric / linear)
        num_drops: int = 3                        # n (geometric / linear)
        reward: str = "length_budget"             # the reward.functions entry that receives budget=
        prompt_template: Optional[str] = None     # e.g. "{prompt}\nUse exactly {budget} tokens." (None: prompts unchanged)

        def __post_init__(self):
            if self.initial_budget < 1:
                raise ValueError(f"length_budget: initial_budget must be >= 1, got {self.initial_budget}")
            if self.schedule not in SCHEDULES:
                raise ValueError(f"length_budget: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
            if self.schedule == "exponential":
                if not 0 < self.decay <= 1:
                    raise ValueError(f"length_budget: decay must be in (0, 1], got {self.decay}")
                if self.period < 1:
                    raise ValueError(f"length_budget: period must be >= 1, got {self.period}")
            else:
                if self.final_budget is None or not 1 <= self.final_budget <= self.initial_budget:
                    raise ValueError(f"length_budget: schedule {self.schedule} needs 1 <= final_budget <= initial_budget, "
                                     f"got {self.final_budget}")
                if self.num_drops < 1:
                    raise ValueError(f"length_budget: num_drops must be >= 1, got {self.num_drops}")
            if self.prompt_template is not None:
                try:
                    self.prompt_template.format(prompt="p", budget=1)
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"length_budget: prompt_template may use only {{prompt}} and {{budget}}: {e!r}") from None

    @classmethod
    def check_config(cls, cfg, params, key: str) -> None:
        """The budget must go somewhere: a reward function of that name, or the prompt."""
        from ..config import ConfigError

        if params.prompt_template is None and params.reward not in _names_in(list(cfg.reward.functions or [])):
            raise ConfigError(f"{key}: no reward.functions entry named {params.reward!r} to receive the budget "
                              f"(add {{name: {params.reward}, weight: ...}}) and no prompt_template")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.budget: Optional[int] = None        # the budget of the running step
        self._prompted: Optional[int] = None     # the budget the prompts currently carry
        self._originals: Dict[int, List[str]] = {}

    def budget_at(self, t: int) -> int:
        p = self.params
        if p.schedule == "exponential":
            return exponential_budget(t, p.initial_budget, p.decay, p.period)
        return stepwise_budget(t, int(self.ctx.total_steps), p.initial_budget, int(p.final_budget), p.num_drops, p.schedule)

    def before_step(self, trainer: Any) -> None:
        self.budget = self.budget_at(int(trainer.step_idx))
        hits = bind_reward_kwargs(trainer.rewarder, self.params.reward, budget=self.budget)
        if not hits and self.params.prompt_template is None:
            raise RuntimeError(f"length_budget: no reward function named {self.params.reward!r} to receive the budget")
        if self.params.prompt_template is not None and self._prompted != self.budget:
            for rows in (trainer.train_rows, getattr(trainer, "eval_rows", None)):
                if rows:
                    self._rewrite_prompts(trainer, rows)
            self._prompted = self.budget

    def _rewrite_prompts(self, trainer: Any, rows: List[Dict[str, Any]]) -> None:
        """Write the budget into each row's prompt and re-tokenize it (an over-long prompt is kept, not dropped:
        the selector indexes these rows)."""
        from ..data import encode_prompt

        d = trainer.cfg.data
        originals = self._originals.setdefault(id(rows), [r["prompt"] for r in rows])
        over = 0
        for r, o in zip(rows, originals):
            r["prompt"] = self._with_budget(o)
            r["prompt_ids"] = encode_prompt(trainer.tokenizer, r["prompt"], d.chat_template, d.system_prompt)
            over += len(r["prompt_ids"]) > d.max_prompt_tokens
        if over:
            log.warning("length_budget: %d prompts are longer than data.max_prompt_tokens=%d with the budget "
                        "instruction (kept)", over, d.max_prompt_tokens)

    def _with_budget(self, prompt: Any) -> Any:
        """The template applied to a text prompt, or to the last user message of a conversational prompt."""
        from ..data import is_messages

        if not is_messages(prompt):
            return self.params.prompt_template.format(prompt=prompt, budget=self.budget)
        msgs = [dict(m) for m in prompt]
        last = max([i for i, m in enumerate(msgs) if m["role"] == "user"] or [len(msgs) - 1])
        msgs[last]["content"] = self.params.prompt_template.format(prompt=msgs[last]["content"], budget=self.budget)
        return msgs

    def after_step(self, trainer: Any, metrics: Dict[str, float]) -> Dict[str, float]:
        out = {"length_budget/budget": float(self.budget)}
        L = metrics.get("response_length/mean")
        if L is not None and math.isfinite(L):
            out["length_budget/length_over_budget"] = L / self.budget
        return out
