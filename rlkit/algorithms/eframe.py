"""EFRame: Exploration - Filter - Replay on top of GRPO.

Paper: Wang et al. 2025, "EFRame: Deeper Reasoning via Exploration-Filter-Replay
Reinforcement Learning Framework", arXiv 2506.22200.  Implementation after the
official code (github 597358816/EFRame, ``verl/trainer/ray_trainer.py::fit`` and
``verl/trainer/buffer.py``), as paraphrased in ``specs/exploration_distill_baselines.md``
Sec. 1 and ``specs/confirmations.md`` Secs. 4-5.  Three plugins:

``rollout_strategy: eframe`` (:class:`EFRameRollout`)
    The single round (``samples_per_prompt`` samples at the recipe's sampling
    settings), then an *exploration round* on the hard prompts: a prompt is hard
    when its valid rewards are all equal and below ``hard_reward_threshold``
    (= "all n samples scored 0", the official ``|A| < 0.01 and r < 0.01``).
    Each hard prompt gets ``explore_samples`` (20) more samples at
    ``explore_temperature`` (1.2) under a *fresh group id*, so the ordinary
    advantage stage computes GRPO advantages within the 20 new samples only.
    Exploration rows carry ``extras["explore"] = 1`` and ``info["temperature"]``.
    With no hard prompt the round is skipped (spec 1.4).

``experience_filter: eframe_filter`` (:class:`EFRameFilter`, post-advantage)
    keeps normal rows with |A| > ``min_abs_adv`` (0.05) and exploration rows with
    |A| > ``explore_min_abs_adv`` (1), drops truncated rows with A > 0, and appends
    the survivors (exploration rows first) to a FIFO *pending* buffer of
    ``pending_capacity`` x IBS rows, IBS = ``prompts_per_step x samples_per_prompt``
    per rank.  Once it holds >= IBS rows the oldest floor(size/IBS)*IBS are
    trained; otherwise it returns ``None`` (no update this step).  Every
    ``replay_freq`` steps, if the *replay* buffer holds >= IBS rows, replayed
    rows are mixed into the step's batch: the whole buffer if it is full, else
    floor(size/IBS)*IBS rows drawn without replacement.  The rows trained at step t
    with |A| > ``replay_min_abs_adv`` (1, negatives too) enter the replay FIFO
    (``replay_size`` x IBS rows) *before* step t's replay check, as in the spec's
    order (``ppo_update(train); replay.push(...); if due: ppo_update(replay)``);
    rlkit trains both in one update, so replayed rows add optimizer steps through
    the trainer's per-step mini-batch count (``trainer.samples_per_minibatch``).
    Rows the pending FIFO drops are logged (``eframe/pending_dropped``,
    ``eframe/pending_dropped_explore``).  ``rescore_after = True``: the trainer re-runs its
    scoring pass on the returned rows (old / ref log-probs at the current weights,
    as the official code does when it trains a pending batch) except on replayed
    rows, which carry ``extras["keep_old_logprobs"] = 1`` and keep the old
    log-probs and advantages stored when they were first trained.

The replay buffer class is registered as ``replay: eframe`` for discovery; it is
used through ``eframe_filter``.

Log-prob temperature of exploration samples (``explore_logprob_temperature``):

* ``"train"`` (default, the official code): every row, including those sampled
  at T = 1.2, is scored at the trainer's log-prob temperature (the main rollout
  temperature, 1.0).  Ratios and KL compare T = 1 policies; the temperature change
  is not importance-corrected (spec 1.4).  The engine's ``rollout_logprobs`` of
  exploration rows are T = 1.2 log-probs, so ``logprob_gap`` includes the
  temperature shift for those rows and ``algorithm.tis_cap`` turns into a
  truncated T=1/T=1.2 importance weight.  Those rows carry ``extras["no_gap_check"] = 1``
  so the trainer's weight-sync check (``logprob_gap``) leaves them out.
* ``"sample"``: each row is scored at the temperature it was sampled at (the
  strategy writes ``extras["logprob_temperature"]``, which the trainer's forward
  honours per row), so exploration rows are trained on-policy for the T = 1.2
  sampler and the rollout-vs-trainer gap stays a weight-sync check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

import torch

from ..batch import SAMPLE_FIELDS, TOKEN_FIELDS, Batch
from ..plugins import ExperienceFilter, RolloutContext
from ..registry import register_filter, register_replay, register_rollout_strategy
from ..rollout.strategies import SingleRound, completions_to_batch, score

Tensor = torch.Tensor
_COUNT_SUFFIXES = ("/errors", "/timeouts", "/skipped")


# ------------------------------------------------------------------ helpers
def row_advantages(batch: Batch) -> Tensor:
    """[S] per-row advantage: the masked token mean (GRPO broadcasts one value per row); 0 for empty rows."""
    if batch.advantages is None:
        raise ValueError("eframe_filter runs after the advantage stage (stage=post_advantage) but batch.advantages is None")
    m = batch.response_mask.float()
    return (batch.advantages.float() * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def local_train_batch_size(ctx, override: Optional[int], who: str) -> int:
    """IBS per rank: ``prompts_per_step / world_size x samples_per_prompt`` unless given."""
    if override:
        return int(override)
    cfg = getattr(ctx, "config", None)
    if cfg is None:
        raise ValueError(f"{who}: train_batch_size is not set and there is no config to derive it from")
    return (cfg.trainer.prompts_per_step // max(int(ctx.world_size), 1)) * cfg.rollout.samples_per_prompt


def concat_rows(batches: List[Optional[Batch]], pad_id: int = 0) -> Optional[Batch]:
    """``Batch.concat`` for rows from different steps: an optional field that is set in some
    batches and not others is filled (weights with 1, log-probs / entropy with 0 -- they are
    rescored).  The inputs are not modified."""
    batches = [b for b in batches if b is not None and len(b)]
    if not batches:
        return None
    for name in TOKEN_FIELDS + SAMPLE_FIELDS:
        have = [getattr(b, name) is not None for b in batches]
        if any(have) and not all(have):
            fixed = []
            for b, h in zip(batches, have):
                if not h:
                    like = b.response_mask if name in TOKEN_FIELDS else b.response_mask[:, 0]
                    fill = torch.ones_like(like) if name in ("token_weights", "sample_weights") else torch.zeros_like(like)
                    b = dataclasses.replace(b, **{name: fill})
                fixed.append(b)
            batches = fixed
    return Batch.concat(batches, pad_id)


def _batch_to_state(b: Optional[Batch]) -> Optional[Dict[str, Any]]:
    return None if b is None else {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}


def _batch_from_state(d: Optional[Dict[str, Any]]) -> Optional[Batch]:
    return None if d is None else Batch(**d)


@register_replay("eframe")
class RowFIFO:
    """FIFO buffer of batch rows with a row capacity: pushing past it drops the oldest rows.
    EFRame's pending batch buffer (2 x IBS) and replay buffer (replay_size x IBS)."""

    def __init__(self, capacity: int, pad_id: int = 0):
        self.capacity = int(capacity)
        self.pad_id = pad_id
        self.rows: Optional[Batch] = None
        self.last_dropped: Optional[Batch] = None

    def __len__(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity

    def push(self, b: Optional[Batch]) -> int:
        """Append rows; returns how many of the oldest were dropped (they are kept in ``last_dropped``
        until the next push, for metrics)."""
        self.rows = concat_rows([self.rows, b], self.pad_id)
        self.last_dropped = None
        over = len(self) - self.capacity
        if over > 0:
            self.last_dropped = self.rows.select(range(over))
            self.rows = self.rows.select(range(over, len(self)))
            return over
        return 0

    def drop_newest(self, n: int) -> None:
        """Remove the ``n`` most recently pushed rows (or all, if fewer are held)."""
        n = min(int(n), len(self))
        if n > 0:
            self.rows = self.rows.select(range(len(self) - n)) if n < len(self) else None

    def pop_oldest(self, n: int) -> Optional[Batch]:
        if n <= 0 or self.rows is None:
            return None
        out = self.rows.select(range(n))
        self.rows = self.rows.select(range(n, len(self))) if n < len(self) else None
        return out

    def sample(self, n: int, generator: torch.Generator) -> Optional[Batch]:
        """``n`` rows uniformly without replacement (the buffer is unchanged)."""
        if n <= 0 or self.rows is None:
            return None
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self.rows.select(torch.sort(idx).values)

    def state_dict(self) -> Dict[str, Any]:
        return {"capacity": self.capacity, "rows": _batch_to_state(self.rows)}

    def load_state_dict(self, s: Dict[str, Any]) -> None:
        self.capacity = int(s["capacity"])
        self.rows = _batch_from_state(s["rows"])


# ---------------------------------------------------------- rollout strategy
@register_rollout_strategy("eframe")
class EFRameRollout(SingleRound):
    """Single round + an exploration round (more samples, higher temperature) on prompts whose samples all scored 0."""

    @dataclass
    class Params:
        explore_samples: int = 20                 # official additional_n
        explore_temperature: float = 1.2          # official additional_temperature
        hard_reward_threshold: float = 0.01       # hard = all valid rewards equal and below this
        explore_logprob_temperature: Literal["train", "sample"] = "train"

        def __post_init__(self):
            if self.explore_samples < 0:
                raise ValueError(f"eframe: explore_samples must be >= 0, got {self.explore_samples}")
            if not self.explore_temperature > 0:
                raise ValueError(f"eframe: explore_temperature must be > 0, got {self.explore_temperature}")
            if self.explore_logprob_temperature not in ("train", "sample"):
                raise ValueError(f"eframe: explore_logprob_temperature must be 'train' or 'sample', got {self.explore_logprob_temperature!r}")

    last_main: Optional[Batch] = None    # the last main-round batch (read by the uec controller's entropy probe)

    def hard_prompts(self, batch: Batch, n_prompts: int) -> List[int]:
        """Indices (into the prompt list) of hard prompts.  The single round gives prompt i the
        i-th group id in order of first appearance."""
        groups = list(batch.group_index().values())
        if len(groups) != n_prompts:
            raise RuntimeError(f"eframe: expected {n_prompts} groups from the single round, got {len(groups)}")
        R = batch.rewards.float()
        out = []
        for i, rows in enumerate(groups):
            r = R[rows]
            r = r[torch.isfinite(r)]
            if r.numel() and bool((r == r[0]).all()) and float(r[0]) < self.params.hard_reward_threshold:
                out.append(i)
        return out

    def __call__(self, rows, rctx: RolloutContext) -> Batch:
        p = self.params
        main = super().__call__(rows, rctx)          # SingleRound: samples, group ids, rewards
        metrics = dict(self.last_metrics)
        self.last_main = main
        S = len(main)
        main.extras["explore"] = torch.zeros(S)
        main.info["temperature"] = [float(rctx.sampling.temperature)] * S
        if p.explore_logprob_temperature == "sample":
            main.extras["logprob_temperature"] = torch.full((S,), float(rctx.sampling.logprob_temperature))
        m = main.response_mask
        if main.rollout_logprobs is not None and m.sum() > 0:   # Monte-Carlo entropy estimate -E[log p] (what EFRame logs)
            metrics["eframe/rollout_entropy"] = float(-(main.rollout_logprobs * m).sum() / m.sum())
        R = main.rewards
        ok = torch.isfinite(R)
        if ok.any():
            metrics["eframe/main_reward_mean"] = float(R[ok].mean())

        hard = self.hard_prompts(main, len(rows)) if p.explore_samples > 0 else []
        metrics.update({"eframe/hard_prompts": float(len(hard)), "eframe/hard_frac": len(hard) / max(len(rows), 1),
                        "eframe/explore_temperature": float(p.explore_temperature),
                        "eframe/explore_samples_per_prompt": float(p.explore_samples)})
        if not hard:                                  # nothing to explore: skip the round (spec 1.4)
            metrics["eframe/explore_samples"] = 0.0
            self.last_metrics = metrics
            return main
        hrows = [rows[i] for i in hard]
        sp = dataclasses.replace(rctx.sampling, temperature=float(p.explore_temperature))
        comps = rctx.engine.generate([r["prompt_ids"] for r in hrows], int(p.explore_samples), sp)
        ex = completions_to_batch(hrows, comps, rctx.alloc_groups(len(hrows)), rctx.pad_id)
        ex_metrics = score(ex, rctx.rewarder)
        for k, v in ex_metrics.items():
            if k.endswith(_COUNT_SUFFIXES):
                metrics[k] = metrics.get(k, 0.0) + v
        E = len(ex)
        ex.extras["explore"] = torch.ones(E)
        ex.info["temperature"] = [float(p.explore_temperature)] * E
        if p.explore_logprob_temperature == "sample":
            ex.extras["logprob_temperature"] = torch.full((E,), float(sp.logprob_temperature))
        # "train": these rows' engine log-probs are T = 1.2 log-probs, scored at T = 1: they say nothing about the
        # weight sync, so the trainer's rollout-vs-trainer gap check leaves them out
        other_t = p.explore_logprob_temperature == "train" and float(p.explore_temperature) != float(rctx.sampling.logprob_temperature)
        ex.extras["no_gap_check"] = torch.full((E,), float(other_t))
        main.extras["no_gap_check"] = torch.zeros(S)
        er = ex.rewards
        eok = torch.isfinite(er)
        solved = 0
        for g_rows in ex.group_index().values():
            r = er[g_rows]
            r = r[torch.isfinite(r)]
            solved += int(r.numel() > 1 and bool((r != r[0]).any()))
        metrics.update({"eframe/explore_samples": float(E), "eframe/explore_solved_frac": solved / len(hard)})
        if eok.any():
            metrics["eframe/explore_reward_mean"] = float(er[eok].mean())
        self.last_metrics = metrics
        return Batch.concat([main, ex], rctx.pad_id)

    # the explore settings may be changed by a controller (uec): they are part of the checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {"explore_samples": self.params.explore_samples, "explore_temperature": self.params.explore_temperature}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.params.explore_samples = int(state.get("explore_samples", self.params.explore_samples))
        self.params.explore_temperature = float(state.get("explore_temperature", self.params.explore_temperature))


# ------------------------------------------------------------------ filter
@register_filter("eframe_filter")
class EFRameFilter(ExperienceFilter):
    """EFRame filter + pending batch buffer + replay (post-advantage; may return None)."""
    stage = "post_advantage"
    rescore_after = True      # the trainer re-scores the returned rows (accumulated rows have stale old log-probs)

    @dataclass
    class Params:
        min_abs_adv: float = 0.05                 # normal groups: keep |A| > this
        explore_min_abs_adv: float = 1.0          # exploration groups: keep |A| > this
        drop_truncated_positive: bool = True      # official _filtering_overlong
        train_batch_size: Optional[int] = None    # IBS per rank; default prompts_per_step / world x samples_per_prompt
        pending_capacity: float = 2.0             # x IBS
        replay: bool = True
        replay_size: float = 2.0                  # replay capacity, x IBS
        replay_freq: int = 5                      # replay every this many steps (when the buffer holds >= IBS rows)
        replay_min_abs_adv: float = 1.0           # trained rows with |A| > this enter replay

        def __post_init__(self):
            for k in ("min_abs_adv", "explore_min_abs_adv", "replay_min_abs_adv"):
                if not getattr(self, k) >= 0:
                    raise ValueError(f"eframe_filter: {k} must be >= 0, got {getattr(self, k)}")
            if self.train_batch_size is not None and self.train_batch_size < 1:
                raise ValueError(f"eframe_filter: train_batch_size must be >= 1 or null, got {self.train_batch_size}")
            if not self.pending_capacity >= 1.0:
                raise ValueError(f"eframe_filter: pending_capacity must be >= 1 (x IBS), got {self.pending_capacity}")
            if not self.replay_size >= 1.0:
                raise ValueError(f"eframe_filter: replay_size must be >= 1 (x IBS), got {self.replay_size}")
            if self.replay_freq < 1:
                raise ValueError(f"eframe_filter: replay_freq must be >= 1, got {self.replay_freq}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        p = self.params
        self.ibs = local_train_batch_size(self.ctx, p.train_batch_size, "eframe_filter")
        pad = getattr(getattr(self.ctx, "tokenizer", None), "pad_token_id", None) or 0
        self.pending = RowFIFO(max(int(p.pending_capacity * self.ibs), self.ibs), pad)
        self.replay = RowFIFO(max(int(p.replay_size * self.ibs), self.ibs), pad)
        self.calls = 0
        self.since_replay = 0
        self.gen = torch.Generator().manual_seed(int(self.ctx.seed) * 1000 + 7919 * int(self.ctx.rank) + 17)
        self._trained: Optional[Batch] = None      # last returned batch (the trainer rescores it in place)
        self._n_trained = 0                        # its first rows are the popped pending rows
        self._admitted_idx: Optional[Tensor] = None  # which of those entered replay (provisionally) this step
        self._metrics: Dict[str, float] = {}

    # --------------------------------------------------------------- replay
    def _admit(self, train: Optional[Batch]) -> int:
        """Push the rows about to be trained with |A| > replay_min_abs_adv into replay *before* this step's
        replay check (spec 1.3 order: ``ppo_update(train); replay.push(...); if step % freq == 0: replay``).
        They enter provisionally (``keep_old_logprobs = 0``: if drawn for replay this very step they are scored
        at the current weights, which is what their stored old log-probs will be) and are replaced by their
        rescored copies on the next call (:meth:`_finalize_admitted`)."""
        self._admitted_idx = None
        if train is None or not self.params.replay:
            return 0
        A = row_advantages(train)
        idx = torch.nonzero(A.abs() > self.params.replay_min_abs_adv).flatten()
        if not idx.numel():
            return 0
        rows = train.select(idx)
        rows.token_weights = None                   # token weighting runs again when the rows are replayed
        rows.extras["keep_old_logprobs"] = torch.zeros(len(rows))
        self.replay.push(rows)
        self._admitted_idx = idx
        return int(idx.numel())

    def _finalize_admitted(self) -> None:
        """Replace the rows admitted at the last call by copies taken from the returned batch after the trainer
        rescored it, so they carry the old (and ref) log-probs computed right before they were first trained."""
        b, n, idx = self._trained, self._n_trained, self._admitted_idx
        self._trained, self._n_trained, self._admitted_idx = None, 0, None
        if b is None or n == 0 or idx is None or not idx.numel():
            return
        k = min(int(idx.numel()), len(self.replay))   # a tiny buffer may hold only the newest of them
        rows = b.select(idx[-k:]) if k else None
        if rows is None:
            return
        rows.token_weights = None
        rows.extras["keep_old_logprobs"] = torch.ones(len(rows))
        self.replay.drop_newest(k)
        self.replay.push(rows)

    def _replay_rows(self) -> Optional[Batch]:
        """Rows to replay this step (None when not due or the buffer holds < IBS rows)."""
        if not self.params.replay:
            return None
        self.since_replay += 1
        if self.since_replay < self.params.replay_freq:
            return None
        self.since_replay = 0                       # a due step without enough rows is skipped (official step % freq)
        size = len(self.replay)
        if size < self.ibs:
            return None
        if self.replay.full:
            return self.replay.rows.select(range(size))   # a copy: the trainer writes token weights into its batch
        return self.replay.sample((size // self.ibs) * self.ibs, self.gen)

    # ---------------------------------------------------------------- call
    def __call__(self, batch: Batch) -> Optional[Batch]:
        p = self.params
        self._finalize_admitted()
        self.calls += 1
        A = row_advantages(batch)
        ex = batch.extras.get("explore")
        explore = (ex > 0.5) if ex is not None else torch.zeros(len(batch), dtype=torch.bool)  # NaN -> normal row
        keep = torch.where(explore, A.abs() > p.explore_min_abs_adv, A.abs() > p.min_abs_adv)
        trunc_pos = torch.zeros_like(keep)
        if p.drop_truncated_positive and batch.truncated is not None:
            trunc_pos = keep & batch.truncated.bool() & (A > 0)
            keep = keep & ~trunc_pos
        idx = torch.cat([torch.nonzero(keep & explore).flatten(), torch.nonzero(keep & ~explore).flatten()])
        kept = batch.select(idx) if idx.numel() else None
        if kept is not None:
            kept.extras["keep_old_logprobs"] = torch.zeros(len(kept))
        overflow = self.pending.push(kept)
        dropped = self.pending.last_dropped
        dropped_ex = int((dropped.extras["explore"] > 0.5).sum()) if dropped is not None and "explore" in dropped.extras else 0
        n_train = (len(self.pending) // self.ibs) * self.ibs
        train = self.pending.pop_oldest(n_train)
        admitted = self._admit(train)               # before the replay check (spec order)
        replay = self._replay_rows()
        out = concat_rows([train, replay], self.pending.pad_id)
        self._trained, self._n_trained = out, (len(train) if train is not None else 0)

        n_ex, n_in = int(explore.sum()), len(batch)
        n_rep = len(replay) if replay is not None else 0
        te = (train.extras["explore"] > 0.5).sum().item() if train is not None and "explore" in train.extras else 0
        self._metrics = {
            "eframe/filter_in": float(n_in), "eframe/filter_kept": float(idx.numel()),
            "eframe/filter_rate": 1.0 - idx.numel() / max(n_in, 1),                       # fraction of rows dropped
            "eframe/normal_kept": float((keep & ~explore).sum()), "eframe/explore_kept": float((keep & explore).sum()),
            "eframe/truncated_pos_dropped": float(trunc_pos.sum()),
            "eframe/pending_rows": float(len(self.pending)), "eframe/pending_overflow": float(overflow),
            "eframe/pending_dropped": float(overflow), "eframe/pending_dropped_explore": float(dropped_ex),
            "eframe/train_rows": float(n_train), "eframe/train_explore_rows": float(te),
            "eframe/replay_buffer_rows": float(len(self.replay)), "eframe/replay_admitted": float(admitted),
            "eframe/replay_rows": float(n_rep), "eframe/replay_share": n_rep / max(len(out) if out is not None else 0, 1),
            "eframe/update": float(out is not None),
        }
        if n_ex:
            self._metrics["eframe/explore_yield"] = float((keep & explore).sum()) / n_ex   # exploration rows kept
        now = batch.extras.get("rollout_step")          # stamped by the trainer: staleness of what is trained
        for name, b in (("train", train), ("replay", replay)):
            if now is not None and len(batch) and b is not None and "rollout_step" in b.extras:
                self._metrics[f"eframe/{name}_staleness"] = float((now.max() - b.extras["rollout_step"]).mean())
        return out

    def metrics(self) -> Dict[str, float]:
        return self._metrics

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        self._finalize_admitted()   # the last admitted rows get their rescored log-probs before saving
        return {"pending": self.pending.state_dict(), "replay": self.replay.state_dict(), "calls": self.calls,
                "since_replay": self.since_replay, "gen": self.gen.get_state(), "replay_freq": self.params.replay_freq}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pending.load_state_dict(state["pending"])
        self.replay.load_state_dict(state["replay"])
        self.calls = int(state["calls"])
        self.since_replay = int(state["since_replay"])
        self.gen.set_state(state["gen"])
        self.params.replay_freq = int(state.get("replay_freq", self.params.replay_freq))
        self._trained, self._n_trained, self._admitted_idx = None, 0, None
