"""SPO -- Segment Policy Optimization: what SPO-chain and SPO-tree share, and the probability mask.

Paper: Guo, Xu, Liu, Ye, Qiu, "Segment Policy Optimization: Effective Segment-Level Credit Assignment in
RL for Large Language Models", arXiv 2505.23564 (NeurIPS 2025).  Official code: github.com/AIFrameResearch/SPO
(HEAD b9fc6a2).  Implementation spec: ``shared/specs/credit_and_sampling.md`` Sec. 2.  Equation numbers are
not quoted (not verified against the paper); the formulas are:

* deterministic token MDP with a terminal reward, so the advantage of a segment k = tokens (t_k, t_{k+1}] is
  ``A_k = V(s_{t_{k+1}}) - V(s_{t_k})`` (segment advantage = difference of state values at its boundaries);
* cut point = a token with ``p_old(y_t | s_t) < rho`` (rho = 0.9); probability mask ``M_t = 1[p_old < rho]``;
  loss ``L = -(1/Z) sum_t M_t min(r_t A_t, clip(r_t, 1 +- eps) A_t)`` (PPO-clip over the masked tokens only).

The two estimators live in :mod:`rlkit.algorithms.spo_chain` and :mod:`rlkit.algorithms.spo_tree`.  This module
registers ``token_weighting: spo_prob_mask`` (:class:`SPOProbMask`): loss only on tokens with ``p < rho``,
advantages zeroed where ``p > rho`` (the code's two comparisons) and whitened with the mean / unbiased std over
the masked tokens.  See ``docs/methods/spo.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Tuple

import torch

from ..batch import Batch
from ..plugins import TokenWeighting
from ..registry import register_token_weighting

Tensor = torch.Tensor
NAN = float("nan")

# batch.extras keys written by the strategies
EXTRA_VALUES = "spo_values"              # [S,T] V(c) at boundary positions c >= 0, NaN elsewhere
EXTRA_PROMPT_VALUE = "spo_prompt_value"  # [S]   V(prompt) (NaN = none: the code's zero-advantage stretch)
EXTRA_TERMINAL = "spo_terminal_value"    # [S]   value assigned to the last response token (the reward)
EXTRA_EDGE_ADV = "spo_edge_advantage"    # [S]   SPO-tree: constant advantage of an edge row



def _hashable(x):
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


def _empty_batch() -> Batch:
    return Batch(prompt_ids=[], response_ids=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1),
                 group_ids=torch.zeros(0, dtype=torch.long), rollout_logprobs=torch.zeros(0, 1),
                 truncated=torch.zeros(0, dtype=torch.bool), rewards=torch.zeros(0))


def _nanmean(xs: Sequence[float]) -> float:
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return math.fsum(v) / len(v) if v else NAN


def _row_columns(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in row.items() if k != "prompt_ids"}


def _require_strategy(cfg, key: str, name: str) -> None:
    from ..config import ConfigError

    strat = getattr(getattr(cfg, "rollout", None), "strategy", None)
    if strat is not None and strat.name != name:
        raise ConfigError(f"{key}: advantage {name!r} reads values stored by the {name!r} rollout strategy; "
                          f"set rollout.strategy: {name} (got {strat.name!r})")




# ------------------------------------------------------------------ probability mask
Reduce = Callable[[Tensor, str], Tensor]     # (tensor, "sum" | "max") -> the same reduction over all ranks


def dist_reduce(device: Any = "cpu") -> Reduce:
    """A :data:`Reduce` over the default ``torch.distributed`` process group (gloo or NCCL; the tensor
    travels on ``device``)."""
    import torch.distributed as dist

    def reduce(t: Tensor, op: str) -> Tensor:
        x = t.to(device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return x.to(t.device)

    return reduce


def masked_whiten_global(x: Tensor, mask: Tensor, reduce: Optional[Reduce] = None, eps: float = 1e-8) -> Tensor:
    """:func:`rlkit.objectives._utils.masked_whiten` with the statistics over the masked tokens of *all* ranks
    (the SPO code's distributed whitening): count and sum, then the sum of squared deviations from the global
    mean, are all-reduced (two-pass variance, unbiased).  Fewer than two masked tokens in total, or all of
    them equal (global max == global min), give zeros.  ``reduce=None``: this rank's tokens only."""
    from ..objectives._utils import masked_whiten

    if reduce is None:
        return masked_whiten(x, mask, eps)
    x = x.to(torch.float64)
    sel = x[mask]
    zeros = torch.zeros_like(x)
    big = torch.tensor(float("inf"), dtype=torch.float64)
    ext = torch.stack([sel.max() if sel.numel() else -big, -sel.min() if sel.numel() else -big])
    ns = reduce(torch.stack([torch.tensor(float(sel.numel()), dtype=torch.float64), sel.sum()]), "sum")
    hi, neg_lo = reduce(ext, "max").tolist()
    n, total = float(ns[0]), ns[1]
    sq = reduce(((sel - total / max(n, 1.0)) ** 2).sum().reshape(1), "sum")[0]   # every rank joins every call
    if n < 2 or hi == -neg_lo:
        return zeros
    mean, var = total / n, sq / (n - 1)
    return torch.where(mask, (x - mean) / torch.sqrt(var + eps), zeros)


def prob_mask_advantages(advantages: Tensor, logprobs: Tensor, mask: Tensor, rho: float = 0.9,
                         whiten: bool = True, reduce: Optional[Reduce] = None) -> Tuple[Tensor, Tensor]:
    """The code's probability mask on one batch.  Returns ``(advantages, loss_mask)``:
    ``loss_mask = mask & (p < rho)``; advantages are set to 0 where ``p > rho`` (the code's ``> 0.9``), then,
    with ``whiten``, whitened with the mean and unbiased std over ``loss_mask`` ((A - mean) / sqrt(var + 1e-8))
    and 0 outside it; with ``reduce`` the mean and std are over the masked tokens of all ranks.  Fewer than two
    masked tokens or all-equal masked values give zeros."""
    m = mask > 0
    p = torch.exp(logprobs.to(torch.float64))
    loss_mask = m & (p < rho)
    a = advantages.to(torch.float64)
    a = torch.where(m & ~(p > rho), a, torch.zeros_like(a))
    if whiten:
        a = masked_whiten_global(a, loss_mask, reduce)
    return a.to(torch.float32), loss_mask


@register_token_weighting("spo_prob_mask")
class SPOProbMask(TokenWeighting):
    """Probability mask + masked whitening (SPO's loss, ``use_prob_mask`` / ``whiten_advantages`` in the code).

    Params:
      rho:    threshold (0.9); loss on ``p < rho`` only, advantages zeroed where ``p > rho``.
      whiten: whiten advantages over the loss-masked tokens of the step's batch.
      whiten_scope: ``global`` (default; the code's distributed whitening: mean / std over the masked tokens
              of every rank's batch, all-reduced) or ``rank`` (this rank's tokens only).
      source: which probabilities: ``rollout`` (default: the engine's log-probs at the rollout temperature,
              the same numbers the chain cut points use; for replayed tree edges they are the generating
              policy's, as in the code) or ``old`` (the trainer's ``old_logprobs``; forces the scoring pass).
    Works with any advantage estimator (the paper's "GRPO + prob mask" ablation)."""

    @dataclass
    class Params:
        rho: float = 0.9
        whiten: bool = True
        whiten_scope: Literal["global", "rank"] = "global"
        source: Literal["rollout", "old"] = "rollout"

        def __post_init__(self):
            if not 0.0 < self.rho <= 1.0:
                raise ValueError(f"spo_prob_mask: rho must be in (0, 1], got {self.rho}")
            if self.whiten_scope not in ("global", "rank"):
                raise ValueError(f"spo_prob_mask: whiten_scope must be global or rank, got {self.whiten_scope!r}")
            if self.source not in ("rollout", "old"):
                raise ValueError(f"spo_prob_mask: source must be rollout or old, got {self.source!r}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.needs = frozenset({"old_logprobs"}) if self.params.source == "old" else frozenset()
        self.reduce: Optional[Reduce] = None           # set when the statistics are cross-rank
        if self.params.whiten and self.params.whiten_scope == "global" and int(self.ctx.world_size) > 1:
            self.reduce = dist_reduce(self.ctx.device)

    def join_empty(self) -> None:
        """A rank with no rows this step still joins the whitening collectives (called by the trainer)."""
        if self.reduce is not None:
            masked_whiten_global(torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool), self.reduce)

    def __call__(self, batch: Batch) -> None:
        p = self.params
        lp = batch.rollout_logprobs if p.source == "rollout" else batch.old_logprobs
        if lp is None:
            raise ValueError(f"spo_prob_mask: batch has no {'rollout_logprobs' if p.source == 'rollout' else 'old_logprobs'}")
        if batch.advantages is None:
            raise ValueError("spo_prob_mask: runs after the advantage stage (batch.advantages is None)")
        if batch.token_weights is None:
            batch.token_weights = torch.ones_like(batch.response_mask)
        live = batch.weights() > 0           # tokens some earlier weighting / sample weight already dropped stay out
        adv, loss_mask = prob_mask_advantages(batch.advantages, lp, live.float(), p.rho, p.whiten, self.reduce)
        batch.token_weights = batch.token_weights * loss_mask.to(batch.token_weights.dtype)
        batch.advantages = adv * batch.response_mask
