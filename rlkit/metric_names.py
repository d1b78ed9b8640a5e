"""rlkit's metric names and TRL's.

A TRL user reads ``reward``, ``rewards/<f>/mean``, ``completions/mean_length`` and ``clip_ratio/*``; rlkit logs
``reward/mean``, ``reward/<f>/mean``, ``response_length/mean`` and ``clipfrac/mean``.  ``trainer.metric_names``
picks what ``metrics.jsonl``, TensorBoard and wandb receive:

* ``both`` (default): rlkit's names, plus TRL's for every metric TRL has;
* ``rlkit``: rlkit's names only;
* ``trl``: TRL's name wherever TRL has one, rlkit's for the rest (TEMPO, D³S, ... metrics have no TRL twin).

The mapping (``docs/metrics.md`` has it as a table) follows TRL 1.16's ``GRPOTrainer`` logging.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

# rlkit name -> TRL name
TRL_NAMES: Dict[str, str] = {
    "reward/mean": "reward",
    "reward/group_std_mean": "reward_std",              # TRL: the mean over groups of the within-group std
    "frac_zero_std_groups": "frac_reward_zero_std",
    "response_length/mean": "completions/mean_length",
    "response_length/min": "completions/min_length",
    "response_length/max": "completions/max_length",
    "truncation_rate": "completions/clipped_ratio",
    "response_length/terminated_mean": "completions/mean_terminated_length",
    "response_length/terminated_min": "completions/min_terminated_length",
    "response_length/terminated_max": "completions/max_terminated_length",
    "clip_low/mean": "clip_ratio/low_mean",
    "clip_low/min": "clip_ratio/low_min",                # min over micro-batches and ranks (TRL: over ranks)
    "clip_high/mean": "clip_ratio/high_mean",
    "clip_high/max": "clip_ratio/high_max",
    "clipfrac/mean": "clip_ratio/region_mean",
    "entropy/mean": "entropy",
    "kl/mean": "kl",
    "lr": "learning_rate",
    "loss/total": "loss",
    # same name in both: num_tokens, epoch, grad_norm
}
_PER_FUNCTION = re.compile(r"^reward/(?!mean$|std$|skipped_frac$|group_std_mean$)(.+)/(mean|std)$")


def trl_name(key: str) -> Optional[str]:
    """TRL's name for an rlkit metric, or None where TRL has no such metric."""
    if key in TRL_NAMES:
        return TRL_NAMES[key]
    m = _PER_FUNCTION.match(key)
    if m and not m.group(1).endswith(("/errors", "/timeouts")):
        return f"rewards/{m.group(1)}/{m.group(2)}"
    return None


def rename(metrics: Dict[str, float], mode: str = "both") -> Dict[str, float]:
    if mode == "rlkit":
        return dict(metrics)
    out: Dict[str, float] = {}
    for k, v in metrics.items():
        t = trl_name(k)
        if t is None or mode == "both":
            out[k] = v
        if t is not None:
            out[t] = v
    return out


def rlkit_name(key: str) -> str:
    """The inverse, for readers (the report) of a run logged with ``metric_names: trl``."""
    for k, v in TRL_NAMES.items():
        if v == key:
            return k
    if key.startswith("rewards/"):
        return "reward/" + key[len("rewards/"):]
    return key
