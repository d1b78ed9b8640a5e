"""The rollout stage: prompt rows -> strategy -> engine -> rewards -> pre-advantage filters.

One :class:`RolloutStage` runs one :class:`RolloutRequest` (one refill round of one step) and returns a
:class:`RolloutResult`.  The trainer uses it in-line with ``rollout.max_staleness: 0`` (its own engine, rewarder,
strategy and pre-filters: today's behaviour bit for bit) and rollout workers build one with
:meth:`RolloutStage.from_config` for ``max_staleness >= 1`` (``rlkit/rollout/workers.py``, ``docs/async.md``).

Everything that depends on trainer state travels in the request: the prompt rows as the trainer holds them (a
controller may rewrite prompts), the sampling params, the strategy's params as controllers left them, the keyword
arguments bound into reward functions, a per-request seed and the first group id.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..batch import Batch
from ..metrics import MetricSums
from ..plugins import PluginContext, RolloutContext
from .base import SamplingParams

PROBE_ROWS = 4  # rows of each request the worker re-scores with the trainer's log-prob math (the exact gap check)


@dataclass
class RolloutRequest:
    step: int                   # trainer step this batch is for (1-based)
    round: int                  # refill round (0 = first)
    prompt_indices: List[int]   # indices into the train rows (this rank's share)
    sampling: SamplingParams    # as controllers set it at request time
    seed: Optional[int]         # per-request RNG seed; None = use the process RNG as it is (in-line, k = 0)
    group_base: int             # group ids allocated by the stage for this request start here (unique per request)
    extras: Dict[str, Any] = field(default_factory=dict)  # rows, strategy params, reward kwargs shipped by the trainer


@dataclass
class RolloutResult:
    step: int
    round: int
    batch: Optional[Batch]      # after strategy + engine + rewards + pre-advantage filters; extras["rollout_step"] set
    rolled: Batch               # the same rollouts before filters (what the selector sees)
    weight_version: int         # version the engine held when it generated
    metrics: Dict[str, Any]     # MetricSums raw partials (sums, counts, maxes, mins, totals), merged by the trainer
    timings: Dict[str, float]   # rollout, reward seconds
    probe: Dict[str, float] = field(default_factory=dict)  # worker-side exact checks (checksum, same-version gap)
    groups_used: int = 0        # group ids taken from group_base on


class TimedRewarder:
    """Wraps the rewarder so reward time can be split out of rollout time."""

    def __init__(self, rewarder):
        self.rewarder, self.elapsed = rewarder, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.rewarder(*a, **kw)
        finally:
            self.elapsed += time.perf_counter() - t


def build_plugin(registry, spec, key: str, pctx: PluginContext):
    """A registered plugin from its recipe spec; a plugin's own ValueError is a ConfigError naming ``key``."""
    from ..config import ConfigError, make_params

    cls = registry.get(spec.name, key)
    params = make_params(cls, spec, key)
    try:
        return cls(params, pctx)
    except ConfigError:
        raise
    except ValueError as e:  # the plugin's own check of its params against the run
        raise ConfigError(f"{key}: {e}") from None


def empty_batch(pad_id: int = 0) -> Batch:
    return Batch(prompt_ids=[], response_ids=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1),
                 group_ids=torch.zeros(0, dtype=torch.long))


def concat_keep_groups(parts: List[Optional[Batch]], n_groups: int, pad_id: int) -> Batch:
    """The rounds of one step as one batch; a refill overshoot keeps the first ``n_groups`` groups, whole
    (one round is never trimmed: a strategy may add groups of its own, e.g. an exploration round)."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return empty_batch()
    b = Batch.concat(parts, pad_id)
    groups = list(dict.fromkeys(b.group_ids.tolist()))
    if len(parts) > 1 and len(groups) > n_groups:
        keep = set(groups[:n_groups])
        b = b.select([i for i, g in enumerate(b.group_ids.tolist()) if g in keep])
    return b


def rollout_metrics(b: Batch, ms: MetricSums, accuracy_key: Optional[str]) -> None:
    """reward / length / truncation / group statistics of one round's rollouts (before filters)."""
    if not len(b):
        return
    S = len(b)
    L = b.response_mask.sum(-1).float()  # policy tokens (multi-turn observation holes excluded)
    ms.total("_gen_tokens", L.sum().item())
    r = b.rewards
    ms.mean("reward/mean", torch.nansum(r).item(), (~torch.isnan(r)).sum().item())
    ms.mean("reward/skipped_frac", torch.isnan(r).sum().item(), S)
    ms.std("reward/std", r)
    for name, comp in b.reward_components.items():
        ms.mean(f"reward/{name}/mean", torch.nansum(comp).item(), (~torch.isnan(comp)).sum().item())
        ms.std(f"reward/{name}/std", comp)
    acc_key = accuracy_key or (next(iter(b.reward_components)) if b.reward_components else None)
    if acc_key in b.reward_components:
        comp = b.reward_components[acc_key]
        ok = ~torch.isnan(comp)
        ms.mean("accuracy", (comp[ok] >= 1.0).float().sum().item(), ok.sum().item())
    ms.mean("response_length/mean", L.sum().item(), S)
    ms.max("response_length/max", L.max().item())
    ms.min("response_length/min", L.min().item())
    ms.mean("truncation_rate", b.truncated.float().sum().item(), S)
    done = ~b.truncated.bool()
    if done.any():  # responses that ended (EOS / stop string), not cut at max_new_tokens
        ms.mean("response_length/terminated_mean", L[done].sum().item(), done.sum().item())
        ms.max("response_length/terminated_max", L[done].max().item())
        ms.min("response_length/terminated_min", L[done].min().item())
    P = torch.tensor([float(len(p)) for p in b.prompt_ids])
    ms.total("_prompt_tokens", P.sum().item())
    ms.mean("prompt_length/mean", P.sum().item(), S)
    ms.max("prompt_length/max", P.max().item())
    ms.min("prompt_length/min", P.min().item())
    zero, std_sum, groups = 0, 0.0, b.group_index()
    for rows in groups.values():
        g = r[rows]
        g = g[~torch.isnan(g)]
        zero += int(g.numel() == 0 or bool((g == g[0]).all()))
        std_sum += g.std().item() if g.numel() > 1 else 0.0
    ms.mean("frac_zero_std_groups", zero, len(groups))
    ms.mean("reward/group_std_mean", std_sum, len(groups))  # TRL's reward_std: the mean within-group std


def weight_checksum(named: Iterable[Tuple[str, torch.Tensor]]) -> float:
    """Exact fingerprint of a set of weights: the tensors' bit patterns summed as integers (associative, so the
    order of the reduction and the thread count cannot change it), mixed with each tensor's position, kept below
    2**52 so the float that carries it is exact.  Equal iff (up to collisions) every bit of every tensor is."""
    total, mod = 0, 1 << 52
    for i, (_, t) in enumerate(named):
        t = t.detach()
        if t.is_floating_point() or t.is_complex():
            itype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
            t = t.contiguous().view(itype)
        s = int(t.sum(dtype=torch.int64).item()) if t.numel() else 0
        total = (total + (i + 1) * 1_000_003 * (s % mod) + s) % mod
    return float(total)


def trainer_logprobs(policy, b: Batch, pad_id: int, temperature: float, device) -> torch.Tensor:
    """The trainer's log-prob math (``Trainer._forward``: rlkit.modeling forward, per-row temperatures from
    ``extras["logprob_temperature"]``) on ``b``'s responses, without grad."""
    from ..modeling import build_inputs

    ids, att, (r, p, c) = build_inputs(b.prompt_ids, b.response_ids, b.response_mask, pad_id)
    temp = temperature
    row_temp = b.extras.get("logprob_temperature")
    if row_temp is not None:
        row_temp = row_temp.float()
        row_temp = torch.where(torch.isnan(row_temp) | (row_temp <= 0), torch.full_like(row_temp, temp), row_temp)
        temp = row_temp[r].to(device)
    with torch.no_grad():
        lp, _, _ = policy(ids.to(device), att.to(device), r.to(device), p.to(device), c.to(device),
                          tuple(b.response_ids.shape), temperature=temp, need_entropy=False)
    return lp


class RolloutStage:
    """prompt rows -> strategy -> engine -> rewards -> pre-advantage filters, used in-line at k=0 and in workers."""

    def __init__(self, cfg, engine, rewarder, strategy, pre_filters, tokenizer, train_rows, pad_id: int,
                 rank: int = 0, world: int = 1, model=None, device=None):
        self.cfg, self.engine, self.rewarder, self.strategy = cfg, engine, rewarder, strategy
        self.pre_filters, self.tokenizer, self.pad_id = list(pre_filters), tokenizer, pad_id
        self._train_rows = train_rows
        self.rank, self.world = rank, world
        self.model, self.device = model, device      # the engine's copy of the weights (worker side only)
        self.version = 0
        self._checksum: Optional[float] = None
        self._policy = None

    # ------------------------------------------------------------------ build
    @classmethod
    def from_config(cls, cfg, rank: int = 0, world: int = 1, device=None) -> "RolloutStage":
        """Worker side: tokenizer, the model (the engine's copy), engine, strategy, rewarder and pre-filters from the
        config alone.  The train rows are loaded only if a request comes without its rows (the trainer ships them)."""
        from ..config import ConfigError
        from ..modeling import load_causal_lm, load_tokenizer
        from ..registry import FILTERS, ROLLOUT_ENGINES, ROLLOUT_STRATEGIES
        from ..rewarding import Rewarder

        m = cfg.model
        device = torch.device(device or "cpu")
        try:
            tok = load_tokenizer(m.tokenizer or m.name_or_path, m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name_or_path={m.tokenizer or m.name_or_path!r}: cannot load the tokenizer: {e}") from None
        lm = load_causal_lm(m.name_or_path, m.dtype, m.trust_remote_code, m.attn_implementation).to(device)
        lm.requires_grad_(False).eval()
        pctx = PluginContext(config=cfg, tokenizer=tok, total_steps=cfg.trainer.total_steps, world_size=world, rank=rank,
                             device=device, seed=cfg.trainer.seed)
        strategy = build_plugin(ROLLOUT_STRATEGIES, cfg.rollout.strategy, "rollout.strategy", pctx)
        filters = [build_plugin(FILTERS, s, f"algorithm.filters[{i}]", pctx) for i, s in enumerate(cfg.algorithm.filters)]
        engine = ROLLOUT_ENGINES.get(cfg.rollout.engine, "rollout.engine")(
            model=lm, tokenizer=tok, config=cfg, samples_per_generate_call=cfg.rollout.samples_per_generate_call,
            **cfg.rollout.engine_args)
        return cls(cfg, engine, TimedRewarder(Rewarder(cfg.reward)), strategy,
                   [f for f in filters if f.stage == "pre_advantage"], tok, None, tok.pad_token_id, rank, world,
                   model=lm, device=device)

    @property
    def train_rows(self) -> List[Dict[str, Any]]:
        if self._train_rows is None:
            from ..data import load_prompts, tokenize_rows

            self._train_rows = tokenize_rows(load_prompts(self.cfg.data, None, "train"), self.cfg.data, self.tokenizer)
        return self._train_rows

    # -------------------------------------------------------------------- run
    def run(self, req: RolloutRequest, ms: Optional[MetricSums] = None) -> RolloutResult:
        """One round.  In-line the trainer passes its own ``ms`` (metrics land there in today's order); a worker
        passes none and the partials travel in the result, with the exact-check ``probe``."""
        own = ms is None
        ms = MetricSums() if own else ms
        if req.seed is not None:  # a worker: every request draws from its own seed, whatever ran before it
            torch.manual_seed(req.seed)
            random.seed(req.seed)
        self._apply(req.extras)
        rows = req.extras.get("rows")
        if rows is None:
            rows = [self.train_rows[i] for i in req.prompt_indices]
        used = 0

        def alloc_groups(n: int) -> List[int]:
            nonlocal used
            ids = [(req.group_base + used + i) * self.world + self.rank for i in range(n)]
            used += n
            return ids

        t0, r0 = time.perf_counter(), self.rewarder.elapsed
        rctx = RolloutContext(engine=self.engine, rewarder=self.rewarder, sampling=req.sampling,
                              samples_per_prompt=self.cfg.rollout.samples_per_prompt, tokenizer=self.tokenizer,
                              step=req.step, alloc_groups=alloc_groups, pad_id=self.pad_id)
        b = self.strategy(rows, rctx)
        # stamp rows with their rollout step: a filter may keep rows for later steps (EFRame), whose
        # rollout log-probs then come from older weights and are left out of the weight-sync gap check
        b.extras.setdefault("rollout_step", torch.full((len(b),), float(req.step)))
        rolled = b
        rollout_metrics(b, ms, self.cfg.reward.accuracy_key)
        for k, v in self.strategy.metrics().items():
            ms.mean(k, v, 1)
        for f in self.pre_filters:
            b = f(b)
            for k, v in f.metrics().items():
                ms.mean(k, v, 1)
        reward_s = self.rewarder.elapsed - r0
        probe = self._probe(rolled, req.sampling) if own and self.model is not None else {}
        return RolloutResult(step=req.step, round=req.round, batch=b, rolled=rolled, weight_version=self.version,
                             metrics=ms._raw() if own else {}, probe=probe, groups_used=used,
                             timings={"rollout": time.perf_counter() - t0 - reward_s, "reward": reward_s})

    def _apply(self, extras: Dict[str, Any]) -> None:
        """Trainer state shipped with a request: the strategy's and the pre-filters' params (a controller may have
        changed them) and the keyword arguments bound into reward functions (e.g. the length budget)."""
        for plugin, params in [(self.strategy, extras.get("strategy_params")),
                               *zip(self.pre_filters, extras.get("filter_params") or [])]:
            if params is not None and dataclasses.is_dataclass(getattr(plugin, "params", None)):
                for k, v in params.items():
                    setattr(plugin.params, k, v)
        kws = extras.get("reward_kwargs")
        if kws is not None:
            import functools

            for rf in getattr(getattr(self.rewarder, "rewarder", self.rewarder), "functions", []):
                if rf.name in kws:
                    base = rf.fn.func if isinstance(rf.fn, functools.partial) else rf.fn
                    rf.fn = functools.partial(base, **kws[rf.name]) if kws[rf.name] else base

    def _probe(self, rolled: Batch, sampling: SamplingParams) -> Dict[str, float]:
        """The exact weight-sync check on the worker: the checksum of the weights it holds, and the gap between
        the engine's log-probs and the trainer's log-prob math at the SAME weights, on a few rows."""
        out = {"weight_checksum": self.weight_checksum(), "weight_version": float(self.version)}
        if not len(rolled) or rolled.rollout_logprobs is None:
            return out
        other_t = rolled.extras.get("no_gap_check")
        ok = [i for i in range(len(rolled)) if other_t is None or not float(other_t[i]) > 0][:PROBE_ROWS]
        if not ok:
            return out
        if self._policy is None:
            from ..modeling import PolicyModule

            self._policy = PolicyModule(self.model, self.pad_id, self.cfg.trainer.logprob_chunk_size)
        sub = rolled.select(ok)
        lp = trainer_logprobs(self._policy, sub, self.pad_id, sampling.logprob_temperature, self.device).float().cpu()
        mask = sub.response_mask.bool()
        gap = (lp - sub.rollout_logprobs.float())[mask].abs()
        if gap.numel():
            out.update({"logprob_gap_sum": float(gap.sum()), "logprob_gap_count": float(gap.numel()),
                        "logprob_gap_max": float(gap.max())})
        return out

    # ---------------------------------------------------------------- weights
    def param_specs(self) -> List[Tuple[str, torch.Size, torch.dtype]]:
        return [(n, p.shape, p.dtype) for n, p in self.model.named_parameters()]

    def load_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int) -> None:
        """Copy the trainer's weights into the engine's model (and into the vLLM engine through its sync)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named_tensors:
                params[name].copy_(t)
        self.engine.sync_weights(self.model)
        self.version, self._checksum = int(version), None

    def weight_checksum(self) -> float:
        if self._checksum is None:
            self._checksum = weight_checksum(self.model.named_parameters())
        return self._checksum

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"strategy": self.strategy.state_dict(), "filters": [f.state_dict() for f in self.pre_filters],
                "version": self.version}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.strategy.load_state_dict(state.get("strategy", {}))
        for f, s in zip(self.pre_filters, state.get("filters", [])):
            f.load_state_dict(s)
