"""How the trainer gets a step's rollouts: in-line (``rollout.max_staleness: 0``) or from rollout workers running
ahead by k versions (``max_staleness: k >= 1``).  The design, the staleness bound and the correction are in
docs/async.md; the stage itself is ``rlkit/rollout/stage.py`` and the transport ``rlkit/rollout/workers.py``.

Protocol at k >= 1 (weight version v = completed trainer steps; v0 = the initial or resumed weights)::

    start:        push_weights(v0)
    step s:       submit R_j for every j <= s + k not yet submitted       # R_j for j > k+1: after push(v_{j-k-1})
                  receive R_s (round 0), refill rounds: submit(R_s round r), receive it
                  train -> push_weights(v_s)

so round 0 of step s was generated with version max(0, s-1-k): staleness min(k, s-1), deterministic.  A refill
round is generated with the newest version (staleness 0).  Every result is checked: the version the worker reports
must be the one pushed before its request (and its weight checksum that of the weights sent: exact), and no batch
more than k versions old is ever trained on (``StalenessError``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..batch import Batch
from ..config import ConfigError
from ..errors import WeightSyncError
from ..metrics import MetricSums
from .stage import RolloutRequest, RolloutResult, RolloutStage, concat_keep_groups, weight_checksum

log = logging.getLogger("rlkit")

GROUP_BLOCK = 1 << 12   # group ids reserved per request at k >= 1 (requests are made before earlier ones ran)
DEFAULT_ASYNC_TIS_CAP = 2.0  # algorithm.tis_cap when unset and max_staleness >= 1 (docs/async.md)
WORKERS = None          # tests inject an in-process double here; None = rlkit.rollout.workers.RolloutWorkers


class StalenessError(RuntimeError):
    """A batch older than rollout.max_staleness versions reached the update (a bug, never a user error)."""


def effective_tis_cap(cfg) -> Optional[float]:
    """``algorithm.tis_cap``; at max_staleness >= 1 an unset cap becomes DEFAULT_ASYNC_TIS_CAP: stale batches always
    get the truncated importance weight min(exp(old - rollout), cap)."""
    cap = cfg.algorithm.tis_cap
    if cap is None and cfg.rollout.max_staleness >= 1:
        log.info("rollout.max_staleness=%d: algorithm.tis_cap unset, using %g for the off-policy correction",
                 cfg.rollout.max_staleness, DEFAULT_ASYNC_TIS_CAP)
        return DEFAULT_ASYNC_TIS_CAP
    return cap


def make_rollouts(trainer):
    return AsyncRollouts(trainer) if trainer.cfg.rollout.max_staleness >= 1 else InlineRollouts(trainer)


def _run_rounds(tr, step: int, ms: MetricSums, run_round) -> Tuple[Batch, List[Batch]]:
    """Round 0, then refill rounds while a pre-filter left fewer than this rank's groups (every rank agrees)."""
    max_rounds = 1 + max([f.max_refill_rounds for f in tr.pre_filters] + [0])
    parts: List[Optional[Batch]] = []
    rolled: List[Batch] = []
    n_groups, rounds = 0, 0
    while True:
        res = run_round(rounds)
        rolled.append(res.rolled)  # what the selector sees: every rollout of this step, before filters
        parts.append(res.batch)
        n_groups += len(res.batch.group_index()) if res.batch is not None and len(res.batch) else 0
        rounds += 1
        if not tr._any(n_groups < tr.local_prompts and rounds < max_rounds):
            break
    ms.mean("rollout/rounds", rounds, 1)
    return concat_keep_groups(parts, tr.local_prompts, tr.pad_id), rolled


def _select(tr, step: int) -> List[int]:
    idx = tr.selector.select(step, tr.cfg.trainer.prompts_per_step)
    return idx[tr.rank * tr.local_prompts:(tr.rank + 1) * tr.local_prompts]


class InlineRollouts:
    """k = 0: the trainer's own engine (sharing its model), strategy, rewarder and pre-filters, as always."""

    def __init__(self, tr):
        self.tr = tr
        self.stage = RolloutStage(tr.cfg, tr.engine, tr.rewarder, tr.strategy, tr.pre_filters, tr.tokenizer,
                                  tr.train_rows, tr.pad_id, tr.rank, tr.world)

    def next(self, step: int, ms: MetricSums, timings: Dict[str, float]) -> Tuple[Batch, List[Batch]]:
        tr, st = self.tr, self.stage
        # the trainer's current objects (a test or a plugin may have swapped one since construction)
        st.engine, st.rewarder, st.strategy, st.pre_filters, st._train_rows = (tr.engine, tr.rewarder, tr.strategy,
                                                                                tr.pre_filters, tr.train_rows)

        def run_round(r: int) -> RolloutResult:
            res = self.stage.run(RolloutRequest(step, r, _select(tr, step), tr.sampling, None, tr._next_group), ms)
            tr._next_group += res.groups_used
            return res

        tr.engine.wake_up()
        t0 = time.perf_counter()
        out = _run_rounds(tr, step, ms, run_round)
        tr.engine.sleep()
        timings["rollout"] = time.perf_counter() - t0 - tr.rewarder.elapsed
        timings["reward"] = tr.rewarder.elapsed
        return out

    def sync(self, version: int, timings: Dict[str, float]) -> None:
        t0 = time.perf_counter()
        self.tr.engine.sync_weights(self.tr.unwrapped_lm)
        timings["weight_sync"] = time.perf_counter() - t0

    def gap_mask(self, mb: Batch, gmask, gap, ms) -> Any:
        return gmask

    def is_metrics(self, ms, ratio, mask) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state) -> None:
        pass

    def close(self) -> None:
        pass


def check_async_config(cfg, tr) -> None:
    """k >= 1 combinations that cannot work, as one-line ConfigErrors naming the key (before any model loads)."""
    k = cfg.rollout.max_staleness
    if k < 1:
        return
    key = f"rollout.max_staleness={k}"  # config-only combinations: rlkit.config.validate_ranges
    for i, c in enumerate(tr.controllers):
        if getattr(c, "async_unsupported", None):
            raise ConfigError(f"{key}: algorithm.controllers[{i}] ({type(c).plugin_name}) {c.async_unsupported}")
    if not dataclasses.is_dataclass(getattr(tr.strategy, "params", None)):
        raise ConfigError(f"{key}: rollout.strategy ({type(tr.strategy).__name__}) has no dataclass Params to ship to "
                          "the rollout workers")


class AsyncRollouts:
    """k >= 1: requests run ahead in rollout workers; results are checked, buffered and consumed in step order."""

    def __init__(self, tr):
        self.tr, self.k = tr, tr.cfg.rollout.max_staleness
        self.workers = None
        self.ready: Dict[Tuple[int, int], RolloutResult] = {}
        self.expected: Dict[Tuple[int, int], int] = {}     # submitted, not yet received -> version it must carry
        self.checksums: Dict[int, float] = {}
        self.next_submit = tr.step_idx + 1
        self.pushed: Optional[int] = None
        self._worker_state = None
        self.max_rounds = 1 + max([f.max_refill_rounds for f in tr.pre_filters] + [0])

    # ----------------------------------------------------------------- set-up
    def _start(self) -> None:
        tr = self.tr
        if tr._deepspeed and getattr(getattr(tr.acc.state, "deepspeed_plugin", None), "zero_stage", 0) == 3:
            raise ConfigError(f"rollout.max_staleness={self.k}: DeepSpeed ZeRO-3 shards the weights the rollout workers "
                              "need; use ZeRO-1/2 or max_staleness: 0")
        cls = WORKERS
        if cls is None:
            from .workers import RolloutWorkers as cls
        specs = [(n, p.shape, p.dtype) for n, p in tr.unwrapped_lm.named_parameters()]
        self.workers = cls(tr.cfg, tr.rank, tr.world, specs)
        if self._worker_state is not None:
            self.workers.load_state_dict(self._worker_state)
        self._push(tr.step_idx, {})

    def _named(self) -> List[Tuple[str, torch.Tensor]]:
        return [(n, p.detach()) for n, p in self.tr.unwrapped_lm.named_parameters()]

    def _push(self, version: int, timings: Dict[str, float]) -> None:
        named = self._named()
        self.checksums[version] = weight_checksum(named)
        for v in [v for v in self.checksums if v < version - self.k - 1]:
            del self.checksums[v]
        timings["weight_transfer"] = float(self.workers.push_weights(named, version))
        self.pushed = version

    # --------------------------------------------------------------- requests
    def _request(self, step: int, rnd: int) -> RolloutRequest:
        tr = self.tr
        mine = _select(tr, step)
        rows = [dict(tr.train_rows[i]) for i in mine]  # as the trainer holds them now (a controller may rewrite prompts)
        extras: Dict[str, Any] = {"rows": rows, "strategy_params": _params(tr.strategy),
                                  "filter_params": [_params(f) for f in tr.pre_filters]}
        kws = {rf.name: dict(rf.fn.keywords) for rf in getattr(tr.rewarder.rewarder, "functions", [])
               if isinstance(rf.fn, functools.partial)}
        if kws:
            extras["reward_kwargs"] = kws
        seed = (int(tr.cfg.trainer.seed) * 1_000_003 + step * 10_007 + rnd * 101 + tr.rank) % (2 ** 31)
        base = ((step - 1) * self.max_rounds + rnd) * GROUP_BLOCK
        return RolloutRequest(step, rnd, mine, copy.deepcopy(tr.sampling), seed, base, extras)

    def _submit(self, step: int, rnd: int) -> None:
        self.workers.submit(self._request(step, rnd))
        self.expected[(step, rnd)] = self.pushed

    def _fill(self, step: int) -> None:
        while self.next_submit <= min(step + self.k, self.tr.cfg.trainer.total_steps):
            self._submit(self.next_submit, 0)
            self.next_submit += 1

    def _receive_one(self) -> None:
        res = self.workers.receive()
        key = (res.step, res.round)
        if key not in self.expected:
            raise WeightSyncError(f"rollout worker returned step {res.step} round {res.round}, which was not requested")
        want = self.expected.pop(key)
        got = res.probe.get("weight_checksum")  # exact: the weights it generated with are bit for bit those of `want`
        if got is None or got != self.checksums.get(want):
            raise WeightSyncError(f"step {res.step}: the rollout worker's weights (checksum {got}) are not the trainer's "
                                  f"version {want} (checksum {self.checksums.get(want)}): a skipped or broken weight push")
        if res.weight_version != want:
            raise WeightSyncError(f"step {res.step}: the rollout worker generated with weight version {res.weight_version}, "
                                  f"expected {want} (a weight push was mislabelled)")
        if res.groups_used > GROUP_BLOCK:
            raise RuntimeError(f"step {res.step}: the rollout strategy allocated {res.groups_used} groups > {GROUP_BLOCK}")
        self.ready[key] = res

    def _take(self, step: int, rnd: int, ms: MetricSums, timings: Dict[str, float]) -> RolloutResult:
        t0 = time.perf_counter()
        while (step, rnd) not in self.ready:
            self._receive_one()
        timings["wait_for_rollout"] = timings.get("wait_for_rollout", 0.0) + time.perf_counter() - t0
        res = self.ready.pop((step, rnd))
        version = self.tr.step_idx  # updates applied so far
        stale = version - res.weight_version
        if stale > self.k or stale < 0:
            raise StalenessError(f"step {step}: a batch of weight version {res.weight_version} would be trained at "
                                 f"version {version}: staleness {stale} outside [0, rollout.max_staleness={self.k}]")
        ms.merge(res.metrics)
        ms.mean("async/staleness", stale, 1)
        ms.max("async/staleness_max", stale)
        p = res.probe
        if p.get("logprob_gap_count"):  # the engine vs the trainer's math at the SAME version: the weight-sync check
            ms.mean("logprob_gap/mean", p["logprob_gap_sum"], p["logprob_gap_count"])
            ms.max("logprob_gap/max", p["logprob_gap_max"])
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if res.batch is not None and len(res.batch):
            res.batch.extras["weight_version"] = torch.full((len(res.batch),), float(res.weight_version))
        return res

    # ------------------------------------------------------------ the trainer
    def next(self, step: int, ms: MetricSums, timings: Dict[str, float]) -> Tuple[Batch, List[Batch]]:
        if self.workers is None:
            self._start()
        self._fill(step)
        timings.update(rollout=0.0, reward=0.0)

        def run_round(r: int) -> RolloutResult:
            if r:
                self._submit(step, r)
            return self._take(step, r, ms, timings)

        return _run_rounds(self.tr, step, ms, run_round)

    def sync(self, version: int, timings: Dict[str, float]) -> None:
        if self.workers is None:
            self._start()
        self._push(version, timings)

    def gap_mask(self, mb: Batch, gmask, gap, ms: MetricSums):
        """Log the off-policy gap per staleness; only rows generated at the current version measure the weight sync
        (the rest is the worker's same-version probe, merged in ``_take``)."""
        wv = mb.extras.get("weight_version")
        if wv is None:
            return gmask
        wv = wv.to(gmask.device).float()
        known = ~torch.isnan(wv)  # NaN: a row kept from a batch without the stamp
        stale = torch.where(known, self.tr.step_idx - wv, torch.full_like(wv, -1.0)).round().long()
        for j in sorted(set(stale[known].tolist())):
            ms.masked(f"async/logprob_gap/staleness_{j}", gap, gmask * (stale == j)[:, None])
        return gmask * (stale == 0)[:, None]

    def is_metrics(self, ms: MetricSums, ratio: torch.Tensor, mask: torch.Tensor) -> None:
        """IS-weight statistics: ``ratio`` = exp(old - rollout) before the cap."""
        cap = self.tr.tis_cap
        ms.masked("async/is_weight", ratio.clamp(max=cap) if cap is not None else ratio, mask, extremes=True)
        if cap is not None:
            ms.masked("async/clipped_frac", (ratio > cap).float(), mask)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Waits for every in-flight result and returns them with the workers' state (strategy state lives there)."""
        if self.workers is None:
            return {"async": {"ready": [], "next_submit": self.next_submit, "workers": self._worker_state}}
        while self.expected:
            self._receive_one()
        return {"async": {"ready": [_result_to_data(r) for _, r in sorted(self.ready.items())],
                          "next_submit": self.next_submit, "workers": self.workers.state_dict()}}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:  # a checkpoint written at k = 0: nothing in flight, the pipeline starts at the next step
            log.info("resume: the checkpoint holds no in-flight rollouts (written with max_staleness: 0); the pipeline "
                     "starts at step %d", self.tr.step_idx + 1)
            self.ready, self.next_submit, self._worker_state = {}, self.tr.step_idx + 1, None
            return
        self.ready = {(d["step"], d["round"]): _result_from_data(d) for d in state["ready"]}
        self.next_submit = int(state["next_submit"])
        self._worker_state = state.get("workers")

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()


def _params(plugin) -> Optional[Dict[str, Any]]:
    """A plugin's Params as a shallow dict (nested values travel as they are), None without dataclass Params."""
    p = getattr(plugin, "params", None)
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)} if dataclasses.is_dataclass(p) else None


def _batch_to_data(b: Optional[Batch]):
    return None if b is None else {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}


def _result_to_data(r: RolloutResult) -> Dict[str, Any]:
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    d["batch"], d["rolled"] = _batch_to_data(r.batch), _batch_to_data(r.rolled)
    return d


def _result_from_data(d: Dict[str, Any]) -> RolloutResult:
    d = dict(d)
    d["batch"] = Batch(**d["batch"]) if d["batch"] is not None else None
    d["rolled"] = Batch(**d["rolled"])
    return RolloutResult(**d)
