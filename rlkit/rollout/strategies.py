"""Rollout strategies: how prompts become a scored batch.

``single`` is the standard GRPO/PPO round: ``samples_per_prompt`` completions
per prompt at the recipe's sampling settings, then rewards.  Methods that need
more rounds (EFRame's exploration round, SPO's prefix continuations) register
their own strategy and reuse :func:`completions_to_batch` and :func:`score`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..batch import Batch
from ..plugins import RolloutContext, RolloutStrategy
from ..registry import register_rollout_strategy
from .base import Completion

PROMPT_COLUMNS_EXCLUDED = ("prompt_ids",)


def completions_to_batch(rows: Sequence[Dict[str, Any]], completions: Sequence[Sequence[Completion]],
                         group_ids: Sequence[int], pad_id: int, prompt_ids: Sequence[Sequence[int]] | None = None) -> Batch:
    """One row per completion; ``completions[i]`` are the samples of ``rows[i]``
    which all get group id ``group_ids[i]``."""
    flat: List[Completion] = []
    pids: List[List[int]] = []
    gids: List[int] = []
    info: Dict[str, List[Any]] = {}
    keys = [k for k in rows[0].keys() if k not in PROMPT_COLUMNS_EXCLUDED] if rows else []
    for i, (row, comps) in enumerate(zip(rows, completions)):
        base_ids = list(prompt_ids[i]) if prompt_ids is not None else list(row["prompt_ids"])
        for c in comps:
            flat.append(c)
            pids.append(base_ids)
            gids.append(int(group_ids[i]))
            for k in keys:
                info.setdefault(k, []).append(row.get(k))
    S = len(flat)
    T = max([len(c.token_ids) for c in flat] + [1])
    ids = torch.full((S, T), pad_id, dtype=torch.long)
    mask = torch.zeros((S, T), dtype=torch.float32)
    lps = torch.zeros((S, T), dtype=torch.float32)
    for r, c in enumerate(flat):
        L = len(c.token_ids)
        if L:
            ids[r, :L] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[r, :L] = 1.0
            lps[r, :L] = torch.tensor(c.logprobs, dtype=torch.float32)
    info["completion"] = [c.text for c in flat]
    info["finish_reason"] = [c.finish_reason for c in flat]
    return Batch(
        prompt_ids=pids, response_ids=ids, response_mask=mask, group_ids=torch.tensor(gids, dtype=torch.long),
        rollout_logprobs=lps, truncated=torch.tensor([c.finish_reason == "length" for c in flat], dtype=torch.bool),
        info=info,
    )


def score(batch: Batch, rewarder) -> Dict[str, float]:
    """Run the reward functions on ``batch`` and store rewards / components."""
    columns = {k: v for k, v in batch.info.items() if k not in ("prompt", "completion", "finish_reason")}
    from ..data import is_messages

    prompts = batch.info.get("prompt", [""] * len(batch))
    # TRL: a conversational prompt gets its completion as messages, [{"role": "assistant", "content": ...}]
    completions = [[{"role": "assistant", "content": c}] if is_messages(p) else c
                   for p, c in zip(prompts, batch.info["completion"])]
    res = rewarder(
        prompts=prompts,
        completions=completions,
        completion_ids=[batch.response_ids[i, : int(n)].tolist() for i, n in enumerate(batch.response_lengths)],
        columns=columns,
        group_ids=batch.group_ids.tolist(),
    )
    batch.rewards = res.rewards
    batch.reward_components = dict(res.components)
    return dict(res.metrics)


@register_rollout_strategy("single")
class SingleRound(RolloutStrategy):
    """One sampling round: ``samples_per_prompt`` completions per prompt."""

    def __call__(self, rows, rctx: RolloutContext) -> Batch:
        comps = rctx.engine.generate([r["prompt_ids"] for r in rows], rctx.samples_per_prompt, rctx.sampling)
        batch = completions_to_batch(rows, comps, rctx.alloc_groups(len(rows)), rctx.pad_id)
        self.last_metrics = score(batch, rctx.rewarder)
        return batch

    def metrics(self) -> Dict[str, float]:
        return getattr(self, "last_metrics", {})
