"""MM-UPT: unsupervised post-training with a majority-vote self-reward.

Paper: Wei et al., "Unsupervised Post-Training for Multi-Modal LLM Reasoning via GRPO"
(arXiv 2505.22453, NeurIPS 2025); code ``waltonfuture/MM-UPT`` (EasyR1).  Spec B Sec. 3.

MM-UPT is plain GRPO whose reward is the group's majority vote, so the method is one
reward function: the built-in ``majority_vote`` (``rewards/majority_vote.py``, installed
as ``rlkit.builtin_rewards.majority_vote``).  This module re-exports it and its helpers
for Python users; the recipe is ``recipes/mmupt.yaml`` and the docs ``docs/methods/mmupt.md``::

    reward:
      functions:
        - {name: majority_vote, extractor: boxed, exclude_none_from_vote: true, min_vote_share: 0.0}
"""
from __future__ import annotations

from ..builtin_rewards.majority_vote import (EXTRACTORS, NONE, majority_vote, normalize_answer,  # noqa: F401
                                             resolve_extractor, vote)

__all__ = ["majority_vote", "vote", "resolve_extractor", "normalize_answer", "EXTRACTORS", "NONE"]
