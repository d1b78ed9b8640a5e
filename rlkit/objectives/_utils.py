"""Shared helpers for the objective plugins (not a plugin module).

* :func:`sequence_rewards` -- the scalar reward R_i per row that outcome
  estimators (GRPO, RLOO, REINFORCE++-baseline, DAPO) use.
* :func:`token_level_rewards` -- the per-token reward r_{i,t} that token-level
  estimators (REINFORCE++, GAE) use.
* :func:`group_moments` -- per-group count / mean / unbiased variance, NaN-aware.
* :func:`masked_whiten` -- verl ``masked_whiten`` with an exact-zero guard.

Conventions shared by every estimator:

* A reward that is NaN (or inf) marks a skipped / unscorable sample: the row is
  left out of every statistic (group means, stds, whitening) and gets A = 0.
* When ``batch.token_rewards`` is set (KL placed in the reward), the sequence
  reward is the masked per-row sum of the token rewards (verl: R_i = sum_t
  token_level_rewards).  A row whose ``batch.rewards`` is NaN stays skipped.
* Statistics are computed in float64 and the results returned as float32.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..batch import Batch

Tensor = torch.Tensor


def token_mask(batch: Batch) -> Tensor:
    """[S,T] bool: real response tokens."""
    return batch.response_mask > 0


def _rewards_valid(batch: Batch) -> Tensor:
    S = len(batch)
    if batch.rewards is None:
        return torch.ones(S, dtype=torch.bool, device=batch.response_mask.device)
    return torch.isfinite(batch.rewards.reshape(-1).to(torch.float64))


def sequence_rewards(batch: Batch) -> Tuple[Tensor, Tensor]:
    """(R [S] float64 with 0 at invalid rows, valid [S] bool)."""
    m = token_mask(batch)
    if batch.token_rewards is not None:
        tr = batch.token_rewards.to(torch.float64)
        tok_ok = torch.where(m, torch.isfinite(tr), torch.ones_like(m)).all(-1)
        R = torch.where(m, tr, torch.zeros_like(tr)).sum(-1)
        valid = tok_ok & _rewards_valid(batch) & torch.isfinite(R)
    elif batch.rewards is not None:
        R = batch.rewards.reshape(-1).to(torch.float64)
        valid = torch.isfinite(R)
    else:
        raise ValueError("advantage estimator: the batch has neither `rewards` nor `token_rewards`; "
                         "the reward stage must run before the advantage stage")
    R = torch.where(valid, R, torch.zeros_like(R))
    return R, valid


def last_token_index(mask: Tensor) -> Tensor:
    """[S] index of the last real token of each row (-1 for an empty row)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, -1)).max(-1).values


def token_level_rewards(batch: Batch) -> Tuple[Tensor, Tensor]:
    """(r [S,T] float64, zero on padding and on invalid rows; valid [S] bool).

    ``batch.token_rewards`` if set, else ``batch.rewards`` placed on the last
    real token of each row (verl ``token_level_scores``)."""
    m = token_mask(batch)
    if batch.token_rewards is not None:
        tr = batch.token_rewards.to(torch.float64)
        valid = torch.where(m, torch.isfinite(tr), torch.ones_like(m)).all(-1) & _rewards_valid(batch)
        r = torch.where(m & valid[:, None], tr, torch.zeros_like(tr))
        return r, valid
    if batch.rewards is None:
        raise ValueError("advantage estimator: the batch has neither `rewards` nor `token_rewards`")
    R = batch.rewards.reshape(-1).to(torch.float64)
    valid = torch.isfinite(R)
    last = last_token_index(m)
    r = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
    rows = torch.nonzero(valid & (last >= 0)).flatten()
    r[rows, last[rows]] = R[rows]
    return r, valid


def group_moments(R: Tensor, valid: Tensor, group_ids: Tensor):
    """Per-group statistics over the valid rows.

    Returns ``(inv, n, mean, var, constant)``: ``inv`` [S] maps a row to its
    group slot; ``n``, ``mean``, ``var`` (unbiased, n-1) and ``constant``
    (True when the group has <= 1 valid row or all its valid rewards are equal)
    are per group."""
    _, inv = torch.unique(group_ids.reshape(-1), return_inverse=True)
    G = int(inv.max().item()) + 1 if inv.numel() else 0
    w = valid.to(torch.float64)
    Rv = torch.where(valid, R, torch.zeros_like(R))
    z = torch.zeros(G, dtype=torch.float64, device=R.device)
    n = z.clone().index_add_(0, inv, w)
    mean = z.clone().index_add_(0, inv, Rv) / n.clamp_min(1.0)
    dev = torch.where(valid, R - mean[inv], torch.zeros_like(R))
    var = z.clone().index_add_(0, inv, dev * dev) / (n - 1.0).clamp_min(1.0)
    inf = torch.full((G,), float("inf"), dtype=torch.float64, device=R.device)
    rmax = (-inf).scatter_reduce(0, inv, torch.where(valid, R, torch.full_like(R, -float("inf"))), "amax")
    rmin = inf.clone().scatter_reduce(0, inv, torch.where(valid, R, torch.full_like(R, float("inf"))), "amin")
    constant = (n <= 1) | (rmax == rmin)
    return inv, n, mean, var, constant


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var_unbiased + eps) over ``mask`` (bool), 0 elsewhere.

    Returns exact zeros when fewer than two tokens are selected or all selected
    values are equal (verl raises for a single token; we return 0 -- there is
    nothing to compare)."""
    x = x.to(torch.float64)
    n = mask.sum()
    zeros = torch.zeros_like(x)
    if n < 2:
        return zeros
    sel = x[mask]
    if bool((sel.max() == sel.min()).item()):
        return zeros
    mean = sel.mean()
    var = ((sel - mean) ** 2).sum() / (n - 1)
    return torch.where(mask, (x - mean) / torch.sqrt(var + eps), zeros)


def broadcast_rows(a: Tensor, mask: Tensor) -> Tensor:
    """[S] -> [S,T] float32, zero on padding."""
    a = a.to(torch.float64)[:, None].expand(mask.shape)
    return torch.where(mask, a, torch.zeros_like(a)).to(torch.float32)
