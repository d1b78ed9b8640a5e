"""DAPO dynamic sampling filter.

Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System
at Scale", Sec. 3.2 "Dynamic Sampling": keep only prompts whose sampled
outputs are neither all correct nor all wrong, i.e. the objective's constraint
0 < |{o_i : is_equivalent(a, o_i)}| < G; oversample until the batch is full.

Generalised as in verl's ``filter_groups``: a group is dropped when all its
(non-NaN) rewards are equal -- GRPO would give it zero advantage.  Singleton
groups and groups with no valid reward are dropped too.  Row order is kept.
``max_refill_rounds`` asks the trainer to sample more prompts (up to that many
extra rounds) until ``prompts_per_step`` groups survive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..batch import Batch
from ..plugins import ExperienceFilter
from ..registry import register_filter
from ._utils import group_moments, sequence_rewards


@register_filter("dapo_dynamic_sampling")
class DAPODynamicSampling(ExperienceFilter):
    stage = "pre_advantage"

    @dataclass
    class Params:
        max_refill_rounds: int = 3
        metric: str = "rewards"

        def __post_init__(self):
            if self.max_refill_rounds < 0:
                raise ValueError(f"dapo_dynamic_sampling: max_refill_rounds must be >= 0, got {self.max_refill_rounds}")
            if self.metric != "rewards":
                raise ValueError(f"dapo_dynamic_sampling: metric must be 'rewards' (the only supported metric), got {self.metric!r}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.max_refill_rounds = int(self.params.max_refill_rounds)
        self._dropped = 0
        self._kept = 0

    def __call__(self, batch: Batch) -> Optional[Batch]:
        # R = batch.rewards (or the sum of token_rewards if those are set), NaN = skipped
        R, valid = sequence_rewards(batch)
        inv, _, _, _, constant = group_moments(R, valid, batch.group_ids)
        keep_row = ~constant[inv]
        self._dropped = int(constant.sum().item())
        self._kept = int(constant.numel() - self._dropped)
        idx = torch.nonzero(keep_row).flatten()
        if idx.numel() == len(batch):
            return batch
        return batch.select(idx)

    def metrics(self) -> Dict[str, float]:
        return {"filter/dapo_dropped_groups": float(self._dropped), "filter/dapo_kept_groups": float(self._kept)}
