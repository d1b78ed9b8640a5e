"""REINFORCE++ (and REINFORCE++-baseline) advantages.

Paper: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
Large Language Models", Sec. 3: token returns G_t = sum_{s>=t} gamma^{s-t} r_s
(Eq. for the return with the KL folded into r_t) and global advantage
normalisation A = (G - mean) / std over all tokens of the batch.  As verl
``reinforce_plus_plus`` / ``reinforce_plus_plus_baseline`` (spec B, Sec. 5.2).

* ``baseline="none"``: G_t = r_t + gamma * G_{t+1} over real tokens, on
  ``batch.token_rewards`` if set, else the reward placed on the last real token.
  Masked holes inside a response (tool / observation tokens) carry the return
  through (G = 0 on the hole itself, no discount across it), as verl 0.9.1 does
  (issue 10, 7a); padding after the last real token holds nothing.
  ``batch.returns`` = G.
* ``baseline="group_mean"``: A_i = R_i - mean(R_group), broadcast over tokens
  (gamma unused).  Singleton groups and all-equal groups give exactly 0 before
  whitening (verl leaves a singleton at R_i).  ``batch.returns`` = advantages.
* Whitening: (x - mean) / sqrt(var_unbiased + 1e-8) over all real tokens of
  valid rows; a batch where every such value is identical gives exactly 0.
* NaN reward -> row excluded from the statistics, A = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator
from ..registry import register_advantage
from ._utils import group_moments, masked_whiten, sequence_rewards, token_level_rewards, token_mask


def discounted_returns(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over real tokens, computed backward.

    Masked positions *inside* a sequence (holes: tool / observation tokens) carry the
    running return through unchanged -- they are not agent steps, so they neither add
    a reward nor a discount -- and get G = 0 themselves.  Positions after the last real
    token (padding) hold no return, so nothing leaks backward from them.  Example
    (gamma = 1): mask [1,1,0,0,1,1], rewards [0,0,0,0,0,1] -> G = [1,1,0,0,1,1]."""
    G = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0]) if r.shape[1] else r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        mt = mask[:, t]
        cand = r[:, t] + gamma * running
        running = torch.where(mt, cand, running)
        G[:, t] = running
    return torch.where(mask, G, torch.zeros_like(G))


@register_advantage("reinforce_pp")
class ReinforcePP(AdvantageEstimator):
    @dataclass
    class Params:
        gamma: float = 1.0
        baseline: Literal["none", "group_mean"] = "none"

        def __post_init__(self):
            if self.baseline not in ("none", "group_mean"):
                raise ValueError(f"reinforce_pp: baseline must be 'none' or 'group_mean', got {self.baseline!r}")
            if not 0.0 <= self.gamma <= 1.0:
                raise ValueError(f"reinforce_pp: gamma must be in [0, 1], got {self.gamma}")

    def __call__(self, batch: Batch) -> None:
        p = self.params
        m = token_mask(batch)
        if p.baseline == "none":
            r, valid = token_level_rewards(batch)
            sel = m & valid[:, None]
            G = discounted_returns(r, sel, p.gamma)
            adv = masked_whiten(G, sel)
            batch.advantages = adv.to(torch.float32)
            batch.returns = G.to(torch.float32)
        else:
            R, valid = sequence_rewards(batch)
            inv, _, mean, _, constant = group_moments(R, valid, batch.group_ids.to(R.device))
            A = torch.where(constant[inv] | ~valid, torch.zeros_like(R), R - mean[inv])
            sel = m & valid[:, None]
            x = torch.where(sel, A[:, None].expand(m.shape), torch.zeros(m.shape, dtype=A.dtype, device=A.device))
            adv = masked_whiten(x, sel).to(torch.float32)
            batch.advantages = adv
            batch.returns = adv.clone()
