"""Loss aggregation: per-token loss [S,T] + mask -> scalar.

Modes follow verl ``agg_loss`` (``loss_agg_mode``) and TRL ``loss_type``
(spec B, Sec. 5.4):

* ``token_mean``              sum m*l / N_tok            DAPO (Yu et al. 2025, token-level
                                                          policy-gradient loss); TRL "dapo"/"bnpo"
* ``seq_mean_token_mean``     sum_i (sum_t m*l / sum_t m) / N_seq
                                                          original GRPO (Shao et al. 2024, Eq. 3); TRL "grpo"
* ``seq_mean_token_sum``      sum m*l / N_seq
* ``seq_mean_token_sum_norm`` sum m*l / (N_seq * L_max)   Dr.GRPO (Liu et al. 2025); TRL "dr_grpo"

Every function takes the GLOBAL normalisers of the optimizer mini-batch in
``norm`` (:class:`~rlkit.plugins.AggNorm`), so summing the values of the
micro-batches of one mini-batch gives exactly the mini-batch value.  Use
:func:`make_norm` for the single-micro-batch case (``norm=None`` does that).

``mask`` may hold fractional weights (token x sample weights); ``num_tokens``
is then the sum of the weights and a sequence's token-mean is its weighted
mean.  Positions with ``mask == 0`` never contribute, even if the loss holds
inf/NaN garbage there.

Padding invariance: every mode is invariant to extra padding columns.
``seq_mean_token_sum_norm`` divides by ``norm.max_len``, which the trainer sets
to a configured constant: ``algorithm.aggregation: {name:
seq_mean_token_sum_norm, max_len: L}``, default ``rollout.max_new_tokens`` (as
TRL's ``max_completion_length``), never the longest response of a mini-batch
(that made the per-token weight vary between mini-batches; issue 10, 7b).
:func:`make_norm` without ``max_len`` uses the padded width (unit tests only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..plugins import AggNorm
from ..registry import register_aggregation

Tensor = torch.Tensor
_TINY = 1e-12


def make_norm(mask: Tensor, max_len: Optional[float] = None) -> AggNorm:
    """Normalisers of one (mini-)batch from its mask [S,T].

    ``num_tokens`` = sum of the mask (weights), ``num_seqs`` = rows with a
    positive mask sum, ``max_len`` = ``max_len`` or the padded width T."""
    w = mask.detach().to(torch.float64)
    return AggNorm(
        num_tokens=float(w.sum().item()),
        num_seqs=float((w.sum(-1) > 0).sum().item()),
        max_len=float(max_len if max_len is not None else mask.shape[-1]),
    )


def _masked(loss: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(loss.dtype)
    return torch.where(mask != 0, loss * m, torch.zeros_like(loss))


def _norm(mask: Tensor, norm: Optional[AggNorm]) -> AggNorm:
    return norm if norm is not None else make_norm(mask)


@register_aggregation("token_mean")
def token_mean(loss: Tensor, mask: Tensor, norm: Optional[AggNorm] = None) -> Tensor:
    """sum m*l / norm.num_tokens"""
    n = _norm(mask, norm)
    return _masked(loss, mask).sum() / max(float(n.num_tokens), _TINY)


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, norm: Optional[AggNorm] = None) -> Tensor:
    """sum_i (sum_t m*l / sum_t m) / norm.num_seqs; empty rows contribute 0."""
    n = _norm(mask, norm)
    row_sum = _masked(loss, mask).sum(-1)
    row_w = mask.to(loss.dtype).sum(-1)
    nonempty = row_w > 0
    per_seq = torch.where(nonempty, row_sum / row_w.clamp_min(_TINY), torch.zeros_like(row_sum))
    return per_seq.sum() / max(float(n.num_seqs), _TINY)


@register_aggregation("seq_mean_token_sum")
def seq_mean_token_sum(loss: Tensor, mask: Tensor, norm: Optional[AggNorm] = None) -> Tensor:
    """sum m*l / norm.num_seqs"""
    n = _norm(mask, norm)
    return _masked(loss, mask).sum() / max(float(n.num_seqs), _TINY)


@register_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm: Optional[AggNorm] = None) -> Tensor:
    """Dr.GRPO: sum m*l / (norm.num_seqs * norm.max_len).

    This is TRL's ``dr_grpo`` (sum / (B * max_completion_length)).  verl's
    ``seq-mean-token-sum-norm`` omits the division by the number of sequences
    (sum / L_max): on the spec example ([1,1] and [2,2,2,2], L_max 4) verl
    gives 2.5, this function 1.25."""
    n = _norm(mask, norm)
    return _masked(loss, mask).sum() / max(float(n.num_seqs) * float(n.max_len), _TINY)


@dataclass
class SumNormParams:
    """``algorithm.aggregation: {name: seq_mean_token_sum_norm, max_len: L}``."""
    max_len: Optional[int] = None    # the constant L; None = rollout.max_new_tokens

    def __post_init__(self):
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"seq_mean_token_sum_norm: max_len must be >= 1 or null, got {self.max_len}")


seq_mean_token_sum_norm.Params = SumNormParams


def norm_max_len(aggregation, params, max_new_tokens: int) -> float:
    """The constant ``AggNorm.max_len`` for a run: the aggregation's ``max_len`` param if it has
    one and it is set, else ``rollout.max_new_tokens`` (independent of padding and of the batch)."""
    v = getattr(params, "max_len", None)
    return float(v if v is not None else max_new_tokens)
