"""Per-token KL estimators between the policy and the reference model.

Reference: Schulman 2020, "Approximating KL Divergence" (blog), estimators
k1, k2, k3 with d = logp - ref_logp on the sampled token:

* ``k1`` (verl "kl"):          d
* ``abs``:                     |d|
* ``k2`` (verl "mse"):         0.5 d^2
* ``k3`` (verl "low_var_kl"):  exp(-d) - (-d) - 1, with -d clamped to [-20, 20]
                               and the result to [-10, 10] (verl)
* ``k3+`` / ``low_var_kl+``:   k3's value with k2's gradient (straight-through, verl "+")

All are elementwise ``fn(logp, ref_logp) -> Tensor``; masking is left to the
aggregation.  The trainer adds ``coef * agg(kl_loss_term(...))`` to the loss
(KL-loss placement) or subtracts ``coef * k(old_logp, ref_logp)`` from the token
rewards (KL-in-reward placement).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..registry import KL_ESTIMATORS, register_kl

Tensor = torch.Tensor


@register_kl("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@register_kl("abs")
def abs_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return (logp - ref_logp).abs()


@register_kl("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    neg_d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(neg_d) - neg_d - 1.0).clamp(-10.0, 10.0)


@register_kl("k3+")
def k3_straight_through(logp: Tensor, ref_logp: Tensor) -> Tensor:
    fwd = k3(logp, ref_logp)
    bwd = k2(logp, ref_logp)
    return bwd - bwd.detach() + fwd.detach()


# verl spellings, as distinct functions so each keeps its own plugin_name
@register_kl("kl")
def kl_verl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return k1(logp, ref_logp)


@register_kl("mse")
def kl_verl_mse(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return k2(logp, ref_logp)


@register_kl("low_var_kl")
def kl_verl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return k3(logp, ref_logp)


@register_kl("low_var_kl+")
def kl_verl_low_var_st(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return k3_straight_through(logp, ref_logp)


_BUILTIN: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": k1, "abs": abs_kl, "k2": k2, "k3": k3, "k3+": k3_straight_through,
    "kl": kl_verl_k1, "mse": kl_verl_mse, "low_var_kl": kl_verl_low_var, "low_var_kl+": kl_verl_low_var_st,
}


def get_kl_estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Built-in estimators directly; anything else through the registry."""
    fn = _BUILTIN.get(name)
    return fn if fn is not None else KL_ESTIMATORS.get(name, "algorithm.kl.estimator")


def kl_loss_term(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL [S,T] for the KL-loss placement (aggregate it with the
    recipe's aggregation and scale by ``algorithm.kl.coef``)."""
    if ref_logp is None:
        raise ValueError("kl_loss_term: ref_logp is None; the trainer must compute ref_logprobs when kl.coef > 0")
    return get_kl_estimator(estimator)(logp, ref_logp.detach())
