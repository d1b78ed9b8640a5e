"""Plugin contracts: one small base class per hook.

Every plugin is a class with a nested ``Params`` dataclass.  The recipe gives a
plugin as a name or as a mapping ``{name: ..., <param>: ...}``; the params are
validated against ``Params`` (unknown keys and wrong types fail with the key
named) before any model loads.  The trainer only calls the methods below; it
never branches on a plugin's name.

``needs`` tells the trainer which per-token fields to compute before the
plugin runs: any of ``old_logprobs``, ``entropy``, ``ref_logprobs``, ``values``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Tuple

import torch

from .batch import Batch

if TYPE_CHECKING:  # pragma: no cover
    from .rollout.base import RolloutEngine, SamplingParams

Tensor = torch.Tensor


@dataclass
class PluginContext:
    """What a plugin may read at construction time."""
    config: Any = None              # the full resolved RLConfig
    tokenizer: Any = None
    total_steps: int = 1
    world_size: int = 1
    rank: int = 0
    device: Any = "cpu"
    seed: int = 0


class Plugin:
    @dataclass
    class Params:
        pass

    needs: FrozenSet[str] = frozenset()

    def __init__(self, params: Optional["Plugin.Params"] = None, ctx: Optional[PluginContext] = None):
        self.params = params if params is not None else self.Params()
        self.ctx = ctx or PluginContext()

    def config_value(self, *path: str, default: Any = None) -> Any:
        """A value of the run's config by attribute path, e.g. ``config_value("trainer", "lr")``;
        ``default`` when there is no config or the value is unset."""
        obj = self.ctx.config
        for p in path:
            if obj is None:
                return default
            obj = getattr(obj, p, None)
        return default if obj is None else obj

    # plugins with internal state (buffers, value models, counters) override these
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------- advantage
class AdvantageEstimator(Plugin):
    """Sets ``batch.advantages`` [S,T] (and ``batch.returns`` for a critic).

    Reads ``batch.rewards`` [S] (or ``batch.token_rewards`` [S,T] when KL is in
    the reward), ``batch.group_ids`` and ``batch.response_mask``.  Advantages
    must be exactly 0 on padding and for groups whose rewards are all equal.
    """
    needs_critic: bool = False

    def __call__(self, batch: Batch) -> None:
        raise NotImplementedError


# -------------------------------------------------------------- policy loss
@dataclass
class LossInputs:
    logprobs: Tensor                 # [S,T] current policy, with grad
    old_logprobs: Tensor             # [S,T] behaviour policy (recomputed by trainer)
    advantages: Tensor               # [S,T]
    mask: Tensor                     # [S,T] float loss weights (mask x token/sample weights)
    rollout_is_weights: Optional[Tensor] = None  # [S,T] truncated IS weights (TIS), no grad
    entropy: Optional[Tensor] = None             # [S,T] current policy entropy (with grad)


class PolicyLoss(Plugin):
    """Returns a per-token loss [S,T] and per-token metric tensors [S,T]
    (the trainer takes their masked mean).  Aggregation is a separate plugin."""

    def __call__(self, inp: LossInputs) -> Tuple[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError


# -------------------------------------------------------------- aggregation
@dataclass
class AggNorm:
    """Normalisers over the whole optimizer mini-batch (all micro-batches, all
    ranks), so that summing micro-batch losses gives the exact mini-batch value."""
    num_tokens: float      # sum of mask over the mini-batch
    num_seqs: float        # number of non-empty sequences in the mini-batch
    max_len: float         # padded response length (or a configured constant)


# ------------------------------------------------------------- regularizers
@dataclass
class ForwardOutput:
    """What the trainer's forward pass over a micro-batch exposes to regularizers."""
    logprobs: Tensor                      # [S,T] sampled-token log-probs, with grad
    entropy: Optional[Tensor]             # [S,T] or None
    hidden: Optional[Tensor] = None       # [S,T,H] final hidden states at response positions
    lm_head: Any = None                   # output projection, for chunked full-vocab terms
    temperature: float = 1.0
    model: Any = None                     # the (unwrapped) policy, e.g. for a teacher pass


class Regularizer(Plugin):
    """An extra loss term.  Returns a per-token loss [S,T] (aggregated with the
    recipe's aggregation and added to the policy loss) and metrics."""

    def __call__(self, inp: LossInputs, fwd: ForwardOutput, batch: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError


# ------------------------------------------------------------------ filters
class ExperienceFilter(Plugin):
    """Drops, keeps or re-weights rows.  ``stage`` is ``"pre_advantage"`` (sees
    rewards only, e.g. DAPO) or ``"post_advantage"`` (sees advantages, e.g.
    D³S).  Returning ``None`` means "nothing to train this step" (a plugin that
    accumulates rows across steps).  ``max_refill_rounds`` > 0 asks the trainer
    to sample more prompts until ``prompts_per_step`` groups survive."""
    stage: str = "pre_advantage"
    max_refill_rounds: int = 0
    rescore_after: bool = False   # re-run the scoring pass on this filter's output (rows kept across steps)

    def __call__(self, batch: Batch) -> Optional[Batch]:
        raise NotImplementedError

    def metrics(self) -> Dict[str, float]:
        return {}


class TokenWeighting(Plugin):
    """Multiplies ``batch.token_weights`` in place (masks are weights of 0/1)."""

    def __call__(self, batch: Batch) -> None:
        raise NotImplementedError


# --------------------------------------------------------- prompt selection
class PromptSelector(Plugin):
    """Chooses which dataset rows to roll out this step.  Must be resumable:
    ``state_dict`` captures the position and RNG so a resumed run sees the
    same prompts."""

    def bind(self, dataset) -> None:
        self.dataset = dataset

    def select(self, step: int, n: int) -> List[int]:
        raise NotImplementedError

    def update(self, batch: Batch) -> Dict[str, float]:
        """Called after rollouts and rewards (e.g. PCL value-model update)."""
        return {}

    def after_advantage(self, batch: Batch) -> Dict[str, float]:
        """Called with this rank's non-empty batch right after the advantage stage (before
        post-advantage filters), e.g. to record advantages per data source.  No collectives
        here (a rank may have nothing to train): gather in ``update``, which every rank calls."""
        return {}


# ----------------------------------------------------------- rollout rounds
@dataclass
class RolloutContext:
    engine: "RolloutEngine"
    rewarder: Any                     # rlkit.rewarding.Rewarder
    sampling: "SamplingParams"
    samples_per_prompt: int
    tokenizer: Any
    step: int = 0
    alloc_groups: Any = None          # alloc_groups(n) -> n fresh group ids, unique across ranks and steps
    pad_id: int = 0


class RolloutStrategy(Plugin):
    """Turns prompt rows into a scored :class:`Batch` (rollouts + rewards).
    Every group it creates takes its id from ``rctx.alloc_groups``."""

    def __call__(self, rows: List[Dict[str, Any]], rctx: RolloutContext) -> Batch:
        raise NotImplementedError

    def metrics(self) -> Dict[str, float]:
        return {}


# -------------------------------------------------------------- controllers
class Controller(Plugin):
    """Runs after each optimizer step (and, optionally, before each step); may change
    other plugins' params or the sampling settings through the trainer.  Returns metrics to log."""

    def before_step(self, trainer: Any) -> None:
        """Runs at the start of every step (also the first one after a resume), before prompts
        are selected; ``trainer.step_idx`` is the number of completed steps."""

    def before_update(self, trainer: Any, batch: Optional[Batch]) -> None:
        """Runs on every rank right before the step's update, with the batch about to be trained
        (advantages and token weights final; ``None`` when this rank trains nothing)."""

    def after_step(self, trainer: Any, metrics: Dict[str, float]) -> Dict[str, float]:
        return {}
