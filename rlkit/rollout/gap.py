"""The weight-sync check: is the rollout engine sampling from the trainer's weights?

Every step the trainer measures ``logprob_gap/mean``, the mean over response tokens of
``|rollout log-prob - trainer log-prob|`` for rows sampled this step.  With the weights in sync it is numerical
noise; after one skipped sync it is the change of one optimizer step.  The run stops with a ``weight sync error``
when::

    gap > max(rollout.max_logprob_gap_error, rollout.logprob_gap_relative x baseline)

where ``baseline`` is the first measured step's gap in this process (that step sets it and is only checked for
being finite).  The absolute part (default 1e-3) decides for float32 runs, whose synced gap is ~3e-7; the relative
part (default 10x) decides where the synced gap is not ~0: bf16/fp16 precision noise (~5e-3 on the toy model, more
on large ones), or a systematic difference such as EFRame's exploration temperature or top-p mass that vLLM's
``logprobs_mode`` cannot serve.  ``logprob_gap_relative: null`` applies the absolute threshold from the first step
on.  It warns above ``max(rollout.max_logprob_gap_warn, logprob_gap_relative / 2 x baseline)``.  Measurements and
commands: docs/reliability.md.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

from ..errors import WeightSyncError

log = logging.getLogger("rlkit")


def gap_thresholds(rollout_cfg, baseline: Optional[float]):
    """``(warn, error)`` thresholds for a step, given the baseline gap (None before the first measurement)."""
    rel = rollout_cfg.logprob_gap_relative
    base = baseline if baseline is not None and rel else 0.0
    error = max(rollout_cfg.max_logprob_gap_error, (rel or 0.0) * base)
    warn = max(rollout_cfg.max_logprob_gap_warn, (rel or 0.0) / 2 * base)
    return warn, error


def check_logprob_gap(gap: Optional[float], rollout_cfg, baseline: Optional[float], step: int) -> Optional[float]:
    """Raise :class:`WeightSyncError` if ``gap`` says the engine's weights are stale; return the (new) baseline."""
    if gap is None:
        return baseline
    if not math.isfinite(gap):
        raise WeightSyncError(f"step {step}: the rollout-vs-trainer log-prob gap is {gap}: the {rollout_cfg.engine} "
                              f"engine returned non-finite log-probs")
    first = baseline is None
    if first:
        baseline = gap
        if rollout_cfg.logprob_gap_relative:
            _, error = gap_thresholds(rollout_cfg, baseline)
            (log.warning if gap > rollout_cfg.max_logprob_gap_warn else log.info)(
                "step %d: rollout-vs-trainer log-prob gap %.3g is the weight-sync check's baseline: later steps stop "
                "the run above %.3g", step, gap, error)
            return baseline
    warn, error = gap_thresholds(rollout_cfg, None if first else baseline)
    if gap > error:
        rel = rollout_cfg.logprob_gap_relative
        why = (f"rollout.max_logprob_gap_error={rollout_cfg.max_logprob_gap_error:g}" if first or not rel or
               rollout_cfg.max_logprob_gap_error >= rel * baseline else
               f"rollout.logprob_gap_relative={rel:g} x the first step's gap {baseline:.3g}")
        raise WeightSyncError(
            f"step {step}: rollout-vs-trainer log-prob gap {gap:.4g} > {error:.3g} ({why}): the {rollout_cfg.engine} engine "
            f"samples from other weights than the trainer's (a skipped or broken weight sync)")
    if gap > warn:
        log.warning("step %d: rollout-vs-trainer log-prob gap %.4g > %.3g (warn threshold)", step, gap, warn)
    return baseline
