"""Prompt selectors.  ``uniform``: epoch-wise shuffled pass over the dataset.

The order is a function of (seed, epoch) only and the position is part of the
checkpoint, so a resumed run sees exactly the prompts an uninterrupted run
would, including across epoch boundaries (a step that straddles the end of an
epoch takes the rest of this epoch and the start of the next).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from .plugins import PromptSelector
from .registry import register_prompt_selector


@register_prompt_selector("uniform")
class UniformSelector(PromptSelector):
    @dataclass
    class Params:
        shuffle: bool = True

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.epoch = 0
        self.pos = 0
        self._perm: List[int] | None = None

    def _order(self) -> List[int]:
        if self._perm is None:
            n = len(self.dataset)
            if self.params.shuffle:
                g = torch.Generator().manual_seed(int(self.ctx.seed) * 100003 + self.epoch)
                self._perm = torch.randperm(n, generator=g).tolist()
            else:
                self._perm = list(range(n))
        return self._perm

    def select(self, step: int, n: int) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            order = self._order()
            take = order[self.pos:self.pos + (n - len(out))]
            out += take
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None
