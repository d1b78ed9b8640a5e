"""The one batch object every pipeline stage reads and writes.

Rows are samples (completions).  ``S`` = number of samples, ``T`` = padded
response length.  Responses are right-padded; ``response_mask`` is 1 on real
response tokens (including a generated EOS) and 0 on padding, so padding can
never enter a loss or a metric as long as stages multiply by the mask.

Per-token fields are ``[S, T]`` tensors aligned with ``response_ids``.  Fields a
stage does not need stay ``None``: the trainer only computes what the chosen
plugins declare in their ``needs`` (e.g. ``ref_logprobs`` only when KL is on).
Per-sample Python values (prompt text, completion text, dataset columns) are in
``info`` as lists of length ``S``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

Tensor = torch.Tensor

# token-level fields, [S, T]
TOKEN_FIELDS = (
    "response_ids", "response_mask", "rollout_logprobs", "old_logprobs", "ref_logprobs", "entropy",
    "values", "old_values", "advantages", "returns", "token_weights", "token_rewards",
)
# sample-level tensors, [S]
SAMPLE_FIELDS = ("group_ids", "rewards", "truncated", "sample_weights")


@dataclass
class Batch:
    prompt_ids: List[List[int]]
    response_ids: Tensor
    response_mask: Tensor
    group_ids: Tensor
    rollout_logprobs: Optional[Tensor] = None
    truncated: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    token_rewards: Optional[Tensor] = None
    old_logprobs: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    values: Optional[Tensor] = None
    old_values: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    token_weights: Optional[Tensor] = None
    sample_weights: Optional[Tensor] = None
    # named per-sample python values: "prompt", "completion", "finish_reason", dataset columns
    info: Dict[str, List[Any]] = field(default_factory=dict)
    # per-sample reward components {function name: [S] tensor}
    reward_components: Dict[str, Tensor] = field(default_factory=dict)
    # free per-token [S,T] or per-sample [S] tensors owned by plugins (e.g. "temperature")
    extras: Dict[str, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @property
    def response_lengths(self) -> Tensor:
        """Index of the last real token + 1 (0 for an empty row).  Equals ``mask.sum`` for a prefix mask; a
        multi-turn row has masked holes (observation tokens) inside its response, which this length includes."""
        m = self.response_mask > 0
        if m.shape[1] == 0:
            return torch.zeros(m.shape[0], dtype=torch.long)
        pos = torch.arange(1, m.shape[1] + 1, device=m.device).expand_as(m)
        return torch.where(m, pos, torch.zeros_like(pos)).max(-1).values.long()

    def group_index(self) -> Dict[int, List[int]]:
        """group id -> row indices (in row order)."""
        out: Dict[int, List[int]] = {}
        for i, g in enumerate(self.group_ids.tolist()):
            out.setdefault(int(g), []).append(i)
        return out

    def weights(self) -> Tensor:
        """Effective per-token loss weights: mask x token_weights x sample_weights."""
        w = self.response_mask.float()
        if self.token_weights is not None:
            w = w * self.token_weights
        if self.sample_weights is not None:
            w = w * self.sample_weights[:, None]
        return w

    # --------------------------------------------------------- row selection
    def select(self, idx: Sequence[int] | Tensor) -> "Batch":
        """Rows ``idx`` (in that order) as a new batch; padding is trimmed."""
        if not isinstance(idx, Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        il = idx.tolist()
        kw: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                kw[f.name] = None
            elif isinstance(v, Tensor):
                kw[f.name] = v[idx]
            elif f.name == "prompt_ids":
                kw[f.name] = [v[i] for i in il]
            elif f.name == "info":
                kw[f.name] = {k: [vals[i] for i in il] for k, vals in v.items()}
            elif f.name in ("reward_components", "extras"):
                kw[f.name] = {k: t[idx] for k, t in v.items()}
            else:
                kw[f.name] = v
        return Batch(**kw).trim()

    def trim(self) -> "Batch":
        """Drop trailing all-padding columns."""
        if len(self) == 0:
            return self
        T = int(self.response_mask.sum(0).nonzero().max().item()) + 1 if self.response_mask.any() else 1
        if T == self.response_ids.shape[1]:
            return self
        for name in TOKEN_FIELDS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[:, :T])
        for k, v in list(self.extras.items()):
            if v.dim() == 2:
                self.extras[k] = v[:, :T]
        return self

    @staticmethod
    def concat(batches: Sequence["Batch"], pad_id: int = 0) -> "Batch":
        """Stack batches row-wise, right-padding token fields to the longest."""
        batches = [b for b in batches if b is not None and len(b) > 0]
        if not batches:
            raise ValueError("Batch.concat needs at least one non-empty batch")
        if len(batches) == 1:
            return batches[0]
        T = max(b.response_ids.shape[1] for b in batches)

        def pad(t: Tensor, value) -> Tensor:
            if t.dim() == 2 and t.shape[1] < T:
                return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)
            return t

        kw: Dict[str, Any] = {}
        first = batches[0]
        for f in dataclasses.fields(first):
            vals = [getattr(b, f.name) for b in batches]
            if f.name == "prompt_ids":
                kw[f.name] = [p for b in batches for p in b.prompt_ids]
            elif f.name == "info":
                keys = set().union(*[b.info.keys() for b in batches])
                kw[f.name] = {k: [x for b in batches for x in b.info.get(k, [None] * len(b))] for k in keys}
            elif f.name in ("reward_components", "extras"):
                keys = set().union(*[getattr(b, f.name).keys() for b in batches])
                d = {}
                for k in keys:
                    parts = []
                    for b in batches:
                        t = getattr(b, f.name).get(k)
                        if t is None:
                            like = next(getattr(x, f.name)[k] for x in batches if k in getattr(x, f.name))
                            shape = (len(b),) + ((T,) if like.dim() == 2 else ())
                            t = torch.full(shape, float("nan"), dtype=like.dtype) if like.is_floating_point() else torch.zeros(shape, dtype=like.dtype)
                        parts.append(pad(t, 0))
                    d[k] = torch.cat(parts)
                kw[f.name] = d
            elif any(v is None for v in vals):
                if all(v is None for v in vals):
                    kw[f.name] = None
                else:
                    raise ValueError(f"Batch.concat: field {f.name!r} is set in some batches and missing in others")
            else:
                padv = pad_id if f.name == "response_ids" else 0
                kw[f.name] = torch.cat([pad(v, padv) for v in vals])
        return Batch(**kw)

    def to(self, device) -> "Batch":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                setattr(self, f.name, v.to(device))
        return self
