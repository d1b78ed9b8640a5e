"""GAE advantages for PPO with a critic, and the clipped value loss.

Papers: Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", Eq. (16):
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lam)^l delta_{t+l}
(computed backward: A_t = delta_t + gamma lam A_{t+1}); Schulman et al. 2017,
"Proximal Policy Optimization Algorithms", Eq. (9) for the value term, with
the clipped value loss of the PPO reference code as in verl
``compute_value_loss`` (spec B, Sec. 5.2).

* ``batch.values`` [S,T]: V_t is the critic value of the state before response
  token t.  V beyond the last real token is 0.  Masked positions inside a
  sequence (e.g. tool-output tokens) pass V and A through (verl).
* Rewards: ``batch.token_rewards`` if set, else ``batch.rewards`` on the last
  real token.
* returns = A + V (before whitening); then A is whitened over all real tokens
  of the batch (masked, unbiased var, +1e-8) when ``whiten`` is true.
* NaN reward -> A = 0 and returns = V for that row (no value target), and the
  row is left out of the whitening.
* Padding: A = 0 and returns = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator
from ..registry import register_advantage
from ._utils import masked_whiten, token_level_rewards, token_mask

Tensor = torch.Tensor


def gae_advantages(r: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """(advantages, returns) [S,T] float64, un-whitened, zero on padding."""
    S, T = r.shape
    V = torch.where(mask, values.to(torch.float64), torch.zeros_like(r))
    adv = torch.zeros_like(r)
    nextv = r.new_zeros(S)
    last = r.new_zeros(S)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * nextv - V[:, t]
        cand = delta + gamma * lam * last
        mt = mask[:, t]
        nextv = torch.where(mt, V[:, t], nextv)
        last = torch.where(mt, cand, last)
        adv[:, t] = last
    adv = torch.where(mask, adv, torch.zeros_like(adv))
    return adv, torch.where(mask, adv + V, torch.zeros_like(adv))


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float) -> Tensor:
    """Per-token clipped value loss [S,T] (zero on padding):
    0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    vclip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (vclip - returns) ** 2
    loss = 0.5 * torch.maximum(l1, l2)
    return torch.where(mask > 0, loss, torch.zeros_like(loss))


def value_clipfrac(values: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float) -> Tensor:
    """Per-token indicator [S,T] that the clipped value branch is the larger one."""
    vclip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return ((vclip - returns) ** 2 > (values - returns) ** 2).float().detach()


@register_advantage("gae")
class GAE(AdvantageEstimator):
    needs_critic = True
    needs = frozenset({"values"})

    @dataclass
    class Params:
        gamma: float = 1.0
        lam: float = 1.0
        whiten: bool = True

        def __post_init__(self):
            if not 0.0 <= self.gamma <= 1.0:
                raise ValueError(f"gae: gamma must be in [0, 1], got {self.gamma}")
            if not 0.0 <= self.lam <= 1.0:
                raise ValueError(f"gae: lam must be in [0, 1], got {self.lam}")

    def __call__(self, batch: Batch) -> None:
        if batch.values is None:
            raise ValueError("gae: batch.values is not set; the trainer must compute critic values (needs={'values'})")
        p = self.params
        m = token_mask(batch)
        r, valid = token_level_rewards(batch)
        sel = m & valid[:, None]
        adv, ret = gae_advantages(r, batch.values, sel, p.gamma, p.lam)
        # rows without a reward: no value target (returns = V), no advantage
        V = torch.where(m, batch.values.to(torch.float64), torch.zeros_like(r))
        ret = torch.where(valid[:, None], ret, V)
        if p.whiten:
            adv = masked_whiten(adv, sel)
        batch.advantages = adv.to(torch.float32)
        batch.returns = ret.to(torch.float32)
