"""Entropy bonus regularizer.

Reference: Williams & Peng 1991, "Function Optimization using Connectionist
Reinforcement Learning Algorithms" (entropy regularisation); as the PPO
objective's entropy term (Schulman et al. 2017, Eq. (9), c_2 S[pi]) and verl's
``entropy_coeff`` (spec B, Sec. 5.6):  loss_t = -coef * H_t.
The per-token term is aggregated with the recipe's aggregation by the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..batch import Batch
from ..plugins import ForwardOutput, LossInputs, Regularizer
from ..registry import register_regularizer

Tensor = torch.Tensor


@register_regularizer("entropy_bonus")
class EntropyBonus(Regularizer):
    needs = frozenset({"entropy"})

    @dataclass
    class Params:
        coef: float = 0.0

    def __call__(self, inp: LossInputs, fwd: ForwardOutput, batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        H = fwd.entropy
        if H is None:
            raise ValueError("entropy_bonus: fwd.entropy is None; the trainer must compute the policy entropy "
                             "for this regularizer (needs={'entropy'})")
        valid = inp.mask > 0
        loss = torch.where(valid, -self.params.coef * H, torch.zeros_like(H))
        return loss, {"entropy": torch.where(valid, H.detach(), torch.zeros_like(H)).detach()}
