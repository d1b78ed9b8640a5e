"""RLOO: REINFORCE with a leave-one-out baseline.

Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", the RLOO estimator
(after Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"):
    A_i = R_i - 1/(n-1) * sum_{j != i} R_j,
equivalently n/(n-1) * (R_i - mean(R_group)) (verl ``rloo``), broadcast over
the response tokens.

* Singleton group -> A = 0 (no other sample to form a baseline).
* NaN reward -> excluded from the baseline (n counts only valid rows), A = 0.
* Group with all-equal valid rewards -> exactly 0.
* With ``batch.token_rewards`` set, R_i = sum_t of the row's token rewards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator
from ..registry import register_advantage
from ._utils import broadcast_rows, group_moments, sequence_rewards, token_mask


@register_advantage("rloo")
class RLOO(AdvantageEstimator):
    @dataclass
    class Params:
        pass

    def sequence_advantages(self, batch: Batch) -> torch.Tensor:
        R, valid = sequence_rewards(batch)
        inv, n, mean, _, constant = group_moments(R, valid, batch.group_ids.to(R.device))
        ng = n[inv]
        A = (R - mean[inv]) * ng / (ng - 1.0).clamp_min(1.0)
        zero = constant[inv] | ~valid
        return torch.where(zero, torch.zeros_like(A), A)

    def __call__(self, batch: Batch) -> None:
        adv = broadcast_rows(self.sequence_advantages(batch), token_mask(batch))
        batch.advantages = adv
        batch.returns = adv.clone()
