"""GRPO group-normalised outcome advantages (and Dr.GRPO).

Paper: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models", Sec. 4.1.2, outcome supervision:
    A_i = (R_i - mean(R_group)) / std(R_group)
broadcast to every response token.  ``scale_by_std=False`` is Dr.GRPO (Liu et
al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
the Dr. GRPO objective): A_i = R_i - mean(R_group).

Implementation conventions (spec B, Sec. 5.2):

* std is the unbiased (n-1) std; eps defaults to 1e-6 (verl).  TRL uses
  eps = 1e-4 (set ``eps: 1e-4``).
* ``std_scope="batch"`` is TRL ``scale_rewards="batch"``: group mean, but the
  std of all valid rewards in the batch.
* Singleton group -> A = 0.  verl uses mean 0 / std 1 there (A = R), which
  feeds the raw reward in as an advantage; a single sample carries no baseline
  information, so we return 0.
* NaN reward (skipped / unscorable sample) -> excluded from the group stats and
  A = 0 (TRL behaviour).
* A group whose valid rewards are all equal gets EXACTLY 0 (explicit guard, no
  eps arithmetic residue).
* If ``batch.token_rewards`` is set (KL in the reward), R_i = sum_t of the
  row's token rewards.
* ``batch.returns`` = the advantages (verl), as a separate tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator
from ..registry import register_advantage
from ._utils import broadcast_rows, group_moments, sequence_rewards, token_mask


class GroupBaseline(NamedTuple):
    R: torch.Tensor       # [S] float64 sequence rewards
    valid: torch.Tensor   # [S] bool, reward not NaN
    mean: torch.Tensor    # [S] the row's group mean
    div: torch.Tensor     # [S] std + eps (or 1 without std scaling)
    live: torch.Tensor    # [S] bool: valid and the group's rewards are not all equal


def group_baseline(batch: Batch, scale_by_std: bool, std_scope: str, eps: float) -> GroupBaseline:
    """The GRPO statistics shared by every group-relative estimator (GRPO, TEMPO, ...)."""
    R, valid = sequence_rewards(batch)
    inv, _, mean, var, constant = group_moments(R, valid, batch.group_ids.to(R.device))
    div = torch.ones_like(R)
    if scale_by_std:
        if std_scope == "group":
            std = var.sqrt()[inv]
        else:
            Rv = R[valid]
            std = (Rv.std(unbiased=True) if Rv.numel() > 1 else R.new_zeros(())).expand_as(R)
        div = std + eps
    return GroupBaseline(R, valid, mean[inv], div, valid & ~constant[inv])


@register_advantage("grpo")
class GRPO(AdvantageEstimator):
    @dataclass
    class Params:
        scale_by_std: bool = True            # False = Dr.GRPO
        eps: float = 1e-6                    # verl 1e-6, TRL 1e-4
        std_scope: Literal["group", "batch"] = "group"

        def __post_init__(self):
            if not self.eps >= 0:
                raise ValueError(f"grpo: eps must be >= 0, got {self.eps}")
            if self.std_scope not in ("group", "batch"):
                raise ValueError(f"grpo: std_scope must be 'group' or 'batch', got {self.std_scope!r}")

    def sequence_advantages(self, batch: Batch) -> torch.Tensor:
        """Per-row advantage [S] (float64)."""
        g = group_baseline(batch, self.params.scale_by_std, self.params.std_scope, self.params.eps)
        return torch.where(g.live, (g.R - g.mean) / g.div, torch.zeros_like(g.R))

    def __call__(self, batch: Batch) -> None:
        m = token_mask(batch)
        adv = broadcast_rows(self.sequence_advantages(batch), m)
        batch.advantages = adv
        batch.returns = adv.clone()
