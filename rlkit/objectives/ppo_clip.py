"""PPO clipped surrogate (with clip-higher and dual-clip).

Papers: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
Eq. (7) (L^CLIP); Ye et al. 2020, "Mastering Complex Control in MOBA Games
with Deep Reinforcement Learning" (dual-clip PPO, bound c > 1); Yu et al.
2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
(clip-higher: eps_low 0.2, eps_high 0.28).
As verl ``vanilla`` (spec B, Sec. 5.3):

    rho = exp(clamp(logp - old_logp, -C, C))
    L1 = -A rho,  L2 = -A clip(rho, 1 - eps_low, 1 + eps_high),  Lc = max(L1, L2)
    L  = min(Lc, -A c)  where A < 0 and dual_clip = c,  else Lc
    L *= rollout_is_weights (truncated IS correction, if given)

Positions with ``mask == 0`` get log-ratio 0, advantage 0 and loss 0, so
garbage values in padding never reach the loss or the gradient.  Per-token
metrics (detached): ``clipfrac`` (L2 > L1: the clip is active, TRL's
``clip_ratio/region_mean``), ``clip_low`` (rho < 1 - eps_low with A < 0) and
``clip_high`` (rho > 1 + eps_high with A > 0), as TRL splits them, ``ppo_kl``
(old_logp - logp), ``dual_clip_frac`` (dual-clip bound active), ``ratio``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..plugins import LossInputs, PolicyLoss
from ..registry import register_policy_loss

Tensor = torch.Tensor


def _zero_pad(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


@register_policy_loss("ppo_clip")
class PPOClip(PolicyLoss):
    # per-micro-batch fractions whose extremes are logged too (TRL's clip_ratio/low_min, clip_ratio/high_max)
    metric_extremes = {"clip_low": "min", "clip_high": "max"}

    @dataclass
    class Params:
        eps_low: float = 0.2
        eps_high: float = 0.2                # DAPO clip-higher: 0.28
        dual_clip: Optional[float] = None    # e.g. 3.0; must be > 1
        log_ratio_clamp: float = 20.0

        def __post_init__(self):
            if not 0.0 <= self.eps_low < 1.0:
                raise ValueError(f"ppo_clip: eps_low must be in [0, 1), got {self.eps_low}")
            if not self.eps_high >= 0.0:
                raise ValueError(f"ppo_clip: eps_high must be >= 0, got {self.eps_high}")
            if self.dual_clip is not None and not self.dual_clip > 1.0:
                raise ValueError(f"ppo_clip: dual_clip must be > 1 (e.g. 3.0) or null, got {self.dual_clip}")
            if not self.log_ratio_clamp > 0.0:
                raise ValueError(f"ppo_clip: log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")

    def __call__(self, inp: LossInputs) -> Tuple[Tensor, Dict[str, Tensor]]:
        p = self.params
        valid = inp.mask > 0
        logp, old = inp.logprobs, inp.old_logprobs.detach()
        log_ratio = _zero_pad(logp - old, valid).clamp(-p.log_ratio_clamp, p.log_ratio_clamp)
        ratio = torch.exp(log_ratio)
        A = _zero_pad(inp.advantages.detach().to(ratio.dtype), valid)
        L1 = -A * ratio
        L2 = -A * ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)
        Lc = torch.maximum(L1, L2)
        if p.dual_clip is not None:
            L3 = -A * p.dual_clip
            neg = A < 0
            loss = torch.where(neg, torch.minimum(Lc, L3), Lc)
            dual = (neg & (Lc > L3)).float()
        else:
            loss = Lc
            dual = torch.zeros_like(Lc)
        if inp.rollout_is_weights is not None:
            loss = loss * _zero_pad(inp.rollout_is_weights.detach().to(loss.dtype), valid)
        loss = _zero_pad(loss, valid)
        metrics = {
            "clipfrac": _zero_pad((L2 > L1).float(), valid).detach(),
            "clip_low": _zero_pad(((ratio < 1.0 - p.eps_low) & (A < 0)).float(), valid).detach(),
            "clip_high": _zero_pad(((ratio > 1.0 + p.eps_high) & (A > 0)).float(), valid).detach(),
            "ppo_kl": _zero_pad(old - logp.detach(), valid),
            "dual_clip_frac": _zero_pad(dual, valid).detach(),
            "ratio": _zero_pad(ratio.detach(), valid),
        }
        return loss, metrics
