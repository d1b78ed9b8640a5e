"""GSPO: Group Sequence Policy Optimization (sequence-level importance ratio).

Paper: Zheng et al. 2025, "Group Sequence Policy Optimization"
(arXiv:2507.18071): the sequence ratio s_i = (pi/pi_old)(y_i|x)^(1/|y_i|) and the
GSPO-token variant:
    s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]
           = exp(sg(l_i) + logp_t - sg(logp_t)),   l_i = mean_t(logp - old_logp)
whose value is the sequence ratio and whose gradient is s_i * grad logp_t.
The log is capped at ``log_ratio_cap`` (10, verl); then clipped like PPO
(no dual-clip):  L = max(-A s, -A clip(s, 1 - eps_low, 1 + eps_high)).

* Defaults eps_low = 3e-4, eps_high = 4e-4: the left/right clip ranges
  reported for the GSPO paper's experiments (sequence-level ratios stay
  close to 1, so the range is ~3 orders of magnitude smaller than PPO's 0.2).
* l_i averages over real tokens (``mask > 0``); fractional token weights in
  ``mask`` do not change the sequence ratio.
* Use aggregation ``seq_mean_token_mean`` (verl forces it for GSPO; TRL
  warns for token-sum modes since they weight sequences by length).
* ``rollout_is_weights`` multiply the loss (verl).
Per-token metrics: ``clipfrac``, ``ppo_kl`` (old_logp - logp), ``ratio``
(the sequence ratio on every token).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..plugins import LossInputs, PolicyLoss
from ..registry import register_policy_loss

Tensor = torch.Tensor


def _zero_pad(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


@register_policy_loss("gspo")
class GSPO(PolicyLoss):
    @dataclass
    class Params:
        eps_low: float = 3e-4
        eps_high: float = 4e-4
        log_ratio_cap: float = 10.0

        def __post_init__(self):
            if not 0.0 <= self.eps_low < 1.0:
                raise ValueError(f"gspo: eps_low must be in [0, 1), got {self.eps_low}")
            if not self.eps_high >= 0.0:
                raise ValueError(f"gspo: eps_high must be >= 0, got {self.eps_high}")

    @staticmethod
    def check_config(cfg, params, key) -> None:
        """Warn (as TRL does) when the aggregation is not seq_mean_token_mean."""
        agg = getattr(getattr(getattr(cfg, "algorithm", None), "aggregation", None), "name", None)
        if agg is not None and agg != "seq_mean_token_mean":
            warnings.warn(f"{key}: gspo is normally used with aggregation seq_mean_token_mean (got {agg!r}); "
                          "token-sum aggregations weight each sequence by its length", stacklevel=2)

    def __call__(self, inp: LossInputs) -> Tuple[Tensor, Dict[str, Tensor]]:
        p = self.params
        valid = inp.mask > 0
        logp, old = inp.logprobs, inp.old_logprobs.detach()
        log_ratio = _zero_pad(logp - old, valid)
        n = valid.to(log_ratio.dtype).sum(-1).clamp_min(1.0)
        seq_log_ratio = (log_ratio.sum(-1) / n).detach()                       # l_i  [S]
        log_s = seq_log_ratio[:, None] + _zero_pad(logp - logp.detach(), valid)
        s = torch.exp(log_s.clamp(max=p.log_ratio_cap))
        A = _zero_pad(inp.advantages.detach().to(s.dtype), valid)
        L1 = -A * s
        L2 = -A * s.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)
        loss = torch.maximum(L1, L2)
        if inp.rollout_is_weights is not None:
            loss = loss * _zero_pad(inp.rollout_is_weights.detach().to(loss.dtype), valid)
        loss = _zero_pad(loss, valid)
        metrics = {
            "clipfrac": _zero_pad((L2 > L1).float(), valid).detach(),
            "ppo_kl": _zero_pad(old - logp.detach(), valid),
            "ratio": _zero_pad(s.detach(), valid),
        }
        return loss, metrics
