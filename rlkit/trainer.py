"""The one RL trainer.  Read it top to bottom: ``train`` loops over ``step``, and
``step`` runs the pipeline of ``../shared/DESIGN.md``::

    select prompts -> rollout + rewards -> pre-advantage filters (refill rounds)
    -> score (old / ref log-probs, entropy, values: only what plugins need)
    -> KL-in-reward -> advantage -> post-advantage filters -> token weighting
    -> PPO epochs over mini-batches of token-budgeted micro-batches
    -> selector update, controllers -> weight sync -> metrics, eval, checkpoint

Every method-specific behaviour comes from a registered plugin; this file
never looks at a plugin's name.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint as ckpt
from .batch import Batch
from .config import ConfigError, RLConfig, make_params, save_config, to_dict
from .metrics import MetricSums
from .modeling import PolicyModule, ValueModule, build_inputs, load_backbone, load_causal_lm, load_tokenizer
from .plugins import AggNorm, ForwardOutput, LossInputs, PluginContext
from .registry import (ADVANTAGES, AGGREGATIONS, CONTROLLERS, FILTERS, KL_ESTIMATORS, POLICY_LOSSES, PROMPT_SELECTORS,
                       REGULARIZERS, ROLLOUT_ENGINES, ROLLOUT_STRATEGIES, TOKEN_WEIGHTING)
from .rollout.base import SamplingParams
from .rollout.stage import TimedRewarder, build_plugin, empty_batch as parts_empty
from .tracking import Tracker

log = logging.getLogger("rlkit")


class Trainer:
    def __init__(self, cfg: RLConfig, train_rows: Optional[List[Dict[str, Any]]] = None,
                 eval_rows: Optional[List[Dict[str, Any]]] = None, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .data import load_prompts
        from .rewarding import Rewarder

        self.cfg = cfg
        t = cfg.trainer
        if accelerator is None:
            from datetime import timedelta

            from accelerate.utils import InitProcessGroupKwargs

            # a collective that a peer never joins fails after distributed_timeout_s (rlkit/distributed.py)
            from .distributed import collective_timeout_s

            pg = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s(t.distributed_timeout_s)))
            from .trackers import tracker_project_config

            accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=_cpu_distributed(), kwargs_handlers=[pg],
                                      log_with=list(t.log_with) or None, project_config=tracker_project_config(t.output_dir))
        self.acc = accelerator
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        from .distributed import Watchdog

        self.watchdog = Watchdog(self.rank, self.world, t.distributed_timeout_s).start()  # no-op for one process
        if t.prompts_per_step % self.world:
            raise ConfigError(f"trainer.prompts_per_step={t.prompts_per_step} must be divisible by the number of processes ({self.world}): groups are never split across ranks")
        self.local_prompts = t.prompts_per_step // self.world
        samples_per_step = t.prompts_per_step * cfg.rollout.samples_per_prompt
        mb = t.samples_per_minibatch or samples_per_step
        self.num_minibatches = max(1, math.ceil(samples_per_step / mb))  # nominal; _num_minibatches counts per step
        set_seed(t.seed + self.rank)

        # data first: a bad field fails before any model loads
        self._raw_train = load_prompts(cfg.data, None, "train", rows=train_rows)
        self._raw_eval = None
        if cfg.data.eval_path or eval_rows is not None:
            self._raw_eval = load_prompts(cfg.data, None, "eval", rows=eval_rows)
        from .preflight import preflight

        preflight(cfg)  # output_dir, resume, model context, engine set-up: before the tokenizer and the model load

        ctx_kw = dict(config=cfg, total_steps=t.total_steps, world_size=self.world, rank=self.rank,
                      device=self.acc.device, seed=t.seed)
        self.pctx = PluginContext(**ctx_kw)
        self._build_plugins()
        from .rollout import async_driver

        async_driver.check_async_config(cfg, self)  # k >= 1 combinations that cannot work: before any model loads
        self.tis_cap = async_driver.effective_tis_cap(cfg)
        self.run_dir = self._run_dir()
        self._resume_from = self._choose_resume()  # verified before any model loads

        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        try:
            self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:  # a missing directory, an unknown hub id, no network
            raise ConfigError(f"{key}={cfg.model.tokenizer or cfg.model.name_or_path!r}: cannot load the tokenizer: {e}") from None
        self.pctx.tokenizer = self.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        from .data import tokenize_rows

        self.train_rows = tokenize_rows(self._raw_train, cfg.data, self.tokenizer)
        self.eval_rows = tokenize_rows(self._raw_eval, cfg.data, self.tokenizer) if self._raw_eval else None
        self.selector.bind(self.train_rows)

        self._build_models()
        self.rewarder = TimedRewarder(Rewarder(cfg.reward))
        # k >= 1: the rollout workers own the configured engine; the trainer's (evaluation) is HF on its own model
        inline = cfg.rollout.max_staleness == 0
        engine_cls = ROLLOUT_ENGINES.get(cfg.rollout.engine if inline else "hf", "rollout.engine")
        self.engine = engine_cls(model=self.unwrapped_lm, tokenizer=self.tokenizer, config=cfg,
                                 samples_per_generate_call=cfg.rollout.samples_per_generate_call,
                                 **(cfg.rollout.engine_args if inline else {}))
        self.sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                       max_new_tokens=cfg.rollout.max_new_tokens, stop=list(cfg.rollout.stop))
        self.step_idx = 0
        self._next_group = 0
        self._num_tokens = 0.0
        self.rollouts = async_driver.make_rollouts(self)  # in-line (k = 0) or rollout workers ahead by k versions
        from . import trackers

        trackers.start(self.acc, cfg, self.run_dir, to_dict(cfg))  # trainer.log_with, through accelerate
        self.tracker = Tracker(self.run_dir, self.acc.is_main_process, accelerator=self.acc)
        if self.acc.is_main_process:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self._maybe_resume()

    # ------------------------------------------------------------------ setup
    def _plugin(self, registry, spec, key):
        return build_plugin(registry, spec, key, self.pctx)

    def _build_plugins(self) -> None:
        a = self.cfg.algorithm
        self.advantage = self._plugin(ADVANTAGES, a.advantage, "algorithm.advantage")
        self.policy_loss = self._plugin(POLICY_LOSSES, a.policy_loss, "algorithm.policy_loss")
        self.aggregate = AGGREGATIONS.get(a.aggregation.name, "algorithm.aggregation")
        from .objectives.aggregation import norm_max_len

        self.agg_max_len = norm_max_len(self.aggregate, make_params(self.aggregate, a.aggregation, "algorithm.aggregation"),
                                        self.cfg.rollout.max_new_tokens)
        self.kl_fn = KL_ESTIMATORS.get(a.kl.estimator, "algorithm.kl.estimator") if a.kl.coef > 0 else None
        self.regularizers = [self._plugin(REGULARIZERS, s, f"algorithm.regularizers[{i}]") for i, s in enumerate(a.regularizers)]
        filters = [self._plugin(FILTERS, s, f"algorithm.filters[{i}]") for i, s in enumerate(a.filters)]
        self.pre_filters = [f for f in filters if f.stage == "pre_advantage"]
        self.post_filters = [f for f in filters if f.stage != "pre_advantage"]
        self.token_weighting = [self._plugin(TOKEN_WEIGHTING, s, f"algorithm.token_weighting[{i}]") for i, s in enumerate(a.token_weighting)]
        self.controllers = [self._plugin(CONTROLLERS, s, f"algorithm.controllers[{i}]") for i, s in enumerate(a.controllers)]
        self.selector = self._plugin(PROMPT_SELECTORS, a.prompt_selector, "algorithm.prompt_selector")
        self.strategy = self._plugin(ROLLOUT_STRATEGIES, self.cfg.rollout.strategy, "rollout.strategy")
        everything = [self.advantage, self.policy_loss, *self.regularizers, *filters, *self.token_weighting, *self.controllers,
                      self.selector, self.strategy]
        self.needs = set().union(*[getattr(p, "needs", frozenset()) for p in everything])
        if self.kl_fn is not None:
            self.needs.add("ref_logprobs")
        if getattr(self.advantage, "needs_critic", False):
            self.needs.add("values")
        self.need_entropy_grad = self.cfg.algorithm.entropy_coef != 0 or any("entropy_grad" in getattr(p, "needs", ()) for p in self.regularizers)
        self.need_hidden = any("hidden" in getattr(p, "needs", ()) for p in self.regularizers)
        # a separate no-grad scoring pass is needed unless the first update's forward can provide old log-probs
        self.score_pass = (self.cfg.trainer.ppo_epochs > 1 or self.num_minibatches > 1 or bool(self.needs & {"old_logprobs", "entropy", "values"})
                           or self.cfg.algorithm.kl.placement == "reward" and self.kl_fn is not None)
        self._plugins_with_state = {"advantage": self.advantage, "policy_loss": self.policy_loss, "selector": self.selector,
                                    "strategy": self.strategy, **{f"filter{i}": f for i, f in enumerate(filters)},
                                    **{f"regularizer{i}": r for i, r in enumerate(self.regularizers)},
                                    **{f"token_weighting{i}": w for i, w in enumerate(self.token_weighting)},
                                    **{f"controller{i}": c for i, c in enumerate(self.controllers)}}

    def _run_dir(self) -> str:
        t = self.cfg.trainer
        name = t.run_name or (os.path.splitext(os.path.basename(self.cfg.recipe))[0] if self.cfg.recipe else "run")
        base = os.path.join(t.output_dir, name)
        if t.resume == "none" and ckpt.list_checkpoints(os.path.join(base, "checkpoints")) + (
                [1] if os.path.exists(os.path.join(base, "metrics.jsonl")) else []):
            i = 1
            while os.path.exists(f"{base}-{i}"):
                i += 1
            base = f"{base}-{i}"  # never overwrite an earlier run; resume=auto continues the named one
        return base

    def _build_models(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        m = cfg.model
        lm = load_causal_lm(m.name_or_path, m.dtype, m.trust_remote_code, m.attn_implementation)
        if m.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(lm, LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                                               target_modules=m.lora.target_modules, task_type="CAUSAL_LM"))
        if m.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if m.lora.enabled:
                lm.enable_input_require_grads()
        critic = ValueModule(load_backbone(m.name_or_path, m.dtype, m.trust_remote_code)) if "values" in self.needs else None
        self.policy = PolicyModule(lm, self.pad_id, t.logprob_chunk_size)
        self.critic = critic
        self.ref = None
        if "ref_logprobs" in self.needs and not m.lora.enabled:  # with LoRA the reference is the base with adapters off
            ref_lm = load_causal_lm(m.name_or_path, m.dtype, m.trust_remote_code, m.attn_implementation)
            ref_lm.requires_grad_(False).eval()
            self.ref = PolicyModule(ref_lm, self.pad_id, t.logprob_chunk_size).to(self.acc.device)
        from transformers import get_scheduler

        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": t.lr}]
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": cfg.algorithm.critic.lr or t.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = get_scheduler(t.lr_schedule, self.optimizer, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.total_steps)
        if critic is not None:
            self.policy, self.critic, self.optimizer = self.acc.prepare(self.policy, self.critic, self.optimizer)
        else:
            self.policy, self.optimizer = self.acc.prepare(self.policy, self.optimizer)
        self.acc.register_for_checkpointing(self.scheduler)  # stepped once per RL step, by us
        from accelerate.utils import DistributedType

        self._deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        log.info("distributed: %s, %d process(es), device %s", self.acc.distributed_type, self.world, self.acc.device)
        self.unwrapped_lm = self.acc.unwrap_model(self.policy).lm

    # ----------------------------------------------------------------- resume
    def _choose_resume(self) -> Optional[str]:
        """The checkpoint ``trainer.resume`` names, verified (``rlkit/checkpoint.py``); rank 0 decides for all."""
        r = self.cfg.trainer.resume
        if r == "none":
            return None
        res = None
        if self.acc.is_main_process:
            try:
                path, damaged = ckpt.choose(os.path.join(self.run_dir, "checkpoints"), r, self.world)
                for why in damaged:
                    log.warning("resume=auto: skipping a damaged checkpoint: %s", why)
                res = ("ok", path)
            except ckpt.CheckpointError as e:
                res = ("error", str(e))
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            res = broadcast_object_list([res])[0]
        if res[0] == "error":
            raise ckpt.CheckpointError(res[1])
        return res[1]

    def _maybe_resume(self) -> None:
        """Load the chosen checkpoint.  Later checkpoints of this run (a branch abandoned by resuming from an older
        one, or damaged ones skipped) move to ``checkpoints/abandoned-<time>/`` with their log lines; never lost."""
        r, path = self.cfg.trainer.resume, self._resume_from
        if r == "none":
            return
        d = os.path.join(self.run_dir, "checkpoints")
        if path is not None:
            self.acc.load_state(os.path.join(path, "state"))
            state = {**ckpt.load_data(os.path.join(path, "rlkit.pt")),  # data only: weights_only=True
                     **ckpt.load_data(os.path.join(path, f"plugins_rank{self.rank}.pt"))}  # each rank's buffers, counters
            self.step_idx = int(state["step"])
            self._next_group = state.get("next_group", 0)
            self._num_tokens = float(state.get("num_tokens", 0.0))
            for k, p in self._plugins_with_state.items():
                if k in state["plugins"]:
                    p.load_state_dict(state["plugins"][k])
            self.rollouts.load_state_dict(state.get("async"))  # k >= 1: the in-flight batches, re-queued
            t = self.cfg.trainer
            lrs = [t.lr] + ([self.cfg.algorithm.critic.lr or t.lr] if self.critic is not None else [])
            for change in ckpt.apply_optimizer_settings(self.optimizer, self.scheduler, lrs, t.adam_betas, t.weight_decay):
                log.warning("resume: %s (the configured value is applied from step %d on)", change, self.step_idx + 1)
        else:
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            later = [c for c in ckpt.candidates(d) if ckpt.step_of(c) > self.step_idx]
            aside = ckpt.move_aside(d, later) if later else None
            if aside:
                log.warning("resumed at step %d: a new branch starts; the later checkpoints %s and their metrics/completions "
                            "lines were moved to %s", self.step_idx, [os.path.basename(c) for c in later], aside)
            for f in ("metrics.jsonl", "completions.jsonl"):  # lines past the step are redone (killed run) or moved aside
                ckpt.truncate_log(os.path.join(self.run_dir, f), self.step_idx, os.path.join(aside, f) if aside else None)
        self.acc.wait_for_everyone()
        if path is not None:
            self.engine.sync_weights(self.unwrapped_lm)
            self.acc.print(f"resumed from {path} at step {self.step_idx}")

    def save_checkpoint(self) -> str:
        """Write ``checkpoints/step_N`` atomically (see ``rlkit/checkpoint.py``); every failure is a one-line
        ``CheckpointError`` that leaves the earlier checkpoints intact."""
        d = os.path.join(self.run_dir, "checkpoints")
        final = os.path.join(d, f"step_{self.step_idx}")
        models = [self.policy] + ([self.critic] if self.critic is not None else [])
        bad = ckpt.first_nonfinite([(n, p) for m in models for n, p in self.acc.unwrap_model(m).named_parameters()]
                                   + list(ckpt.optimizer_tensors(self.optimizer)))
        if self._any(bad is not None):
            raise ckpt.CheckpointError(f"{final}: not written: {bad or 'a tensor on another rank'} is not finite; "
                                       "the earlier checkpoints are kept")
        keep = self.cfg.trainer.keep_checkpoints
        # taken once (a state_dict may have side effects, e.g. EFRame admits trained rows to its replay buffer)
        plugin_state = {"next_group": self._next_group, "num_tokens": self._num_tokens, "plugins": {k: p.state_dict() for k, p in self._plugins_with_state.items()},
                        **self.rollouts.state_dict()}  # k >= 1: waits for the in-flight batches and stores them
        err = self._write_checkpoint(final + ".tmp", plugin_state)
        if err is not None:
            pruned = self._room_after_failed_write(d, final, keep, err)
            err = self._write_checkpoint(final + ".tmp", plugin_state) if pruned else err
            if err is not None:
                self._cleanup_failed_write(d, final, err)
        if self.acc.is_main_process:
            if os.path.exists(final):  # unreachable after resume moves later checkpoints aside; never overwrite
                ckpt.move_aside(d, [final])
            ckpt.publish(final + ".tmp", final)
            ckpt.prune(d, keep)
        self.acc.wait_for_everyone()
        return final

    def _write_checkpoint(self, tmp: str, plugin_state: Dict[str, Any]) -> Optional[BaseException]:
        """Every file of a checkpoint plus its manifest into ``tmp``.  Returns None, or this rank's first error
        (every rank learns that some rank failed; the phases with collectives run on every rank regardless)."""
        import shutil

        err: Optional[BaseException] = None

        def attempt(fn, *a, collective=False):
            nonlocal err
            if err is None or collective:
                try:
                    fn(*a)
                except Exception as e:  # ENOSPC surfaces as OSError, RuntimeError (torch.save) or SafetensorError
                    err = err or e

        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            attempt(os.makedirs, tmp)
        self.acc.wait_for_everyone()
        attempt(self.acc.save_state, os.path.join(tmp, "state"), collective=True)
        attempt(self.save_model, os.path.join(tmp, "model"), collective=True)
        attempt(ckpt.save_data, plugin_state, os.path.join(tmp, f"plugins_rank{self.rank}.pt"))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:  # the manifest is written last: its presence marks a complete checkpoint
            attempt(ckpt.save_data, {"step": self.step_idx, **plugin_state}, os.path.join(tmp, "rlkit.pt"))
            attempt(ckpt.write_manifest, tmp, self.step_idx, self.world)
        if self._any(err is not None):
            return err or ckpt.CheckpointError("another rank failed to write its part")
        return None

    def _room_after_failed_write(self, d: str, final: str, keep: int, err: BaseException) -> bool:
        """After a failed write: remove the partial ``.tmp``; if the disk is full and pruning what the keep policy
        would prune anyway makes room, prune it now so the retry fits.  Same answer on every rank."""
        import shutil

        pruned: List[str] = []
        if self.acc.is_main_process:
            tmp = final + ".tmp"
            partial = ckpt.dir_size(tmp) if os.path.isdir(tmp) else 0
            shutil.rmtree(tmp, ignore_errors=True)
            done = ckpt.list_checkpoints(d)
            self._ckpt_bytes = int(1.05 * max([partial] + ([ckpt.dir_size(done[-1])] if done else []))) + (1 << 16)
            if self._disk_full(d, err):
                pruned = ckpt.room_by_pruning(d, keep, self._ckpt_bytes)
                for p in pruned:
                    shutil.rmtree(p, ignore_errors=True)
                if pruned:
                    log.warning("disk full writing %s: pruned %s first (trainer.keep_checkpoints=%d removes them once "
                                "it exists) and retrying", final, [os.path.basename(p) for p in pruned], keep)
        return self._any(bool(pruned))

    def _disk_full(self, d: str, err: BaseException) -> bool:
        import shutil

        return (ckpt.is_no_space(err) or "No space left" in str(err)
                or shutil.disk_usage(d).free < getattr(self, "_ckpt_bytes", 1 << 20))

    def _cleanup_failed_write(self, d: str, final: str, err: BaseException) -> None:
        import shutil

        if self.acc.is_main_process:
            shutil.rmtree(final + ".tmp", ignore_errors=True)
        self.acc.wait_for_everyone()
        full = self._disk_full(d, err)
        if not full and not isinstance(err, (OSError, ckpt.CheckpointError)):
            raise err  # not the disk: a bug in rlkit or a plugin, keep its traceback
        kept = [os.path.basename(p) for p in ckpt.list_checkpoints(d)]
        if not full:
            raise ckpt.CheckpointError(f"{final}: not written: {err}; the partial write was removed and the earlier "
                                       f"checkpoints {kept} are intact") from None
        raise ckpt.CheckpointError(f"{final}: not written (no space left on device; {shutil.disk_usage(d).free / 2**20:.1f} "
                                   f"MiB free); the partial write was removed and the earlier checkpoints {kept} are intact: "
                                   "free space, then rerun with trainer.resume=auto") from None

    def save_model(self, path: str) -> None:
        """HF-format weights (LoRA merged) + tokenizer, loadable by from_pretrained and vLLM."""
        lm = self.unwrapped_lm
        state = self.acc.get_state_dict(self.policy)  # gathers ZeRO-3 shards
        if self.acc.is_main_process:
            state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
            if hasattr(lm, "merge_and_unload"):  # peft: write merged base weights
                import copy

                merged = copy.deepcopy(lm).merge_and_unload()
                merged.save_pretrained(path, safe_serialization=True)
            else:
                lm.save_pretrained(path, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------ train
    def train(self) -> Dict[str, float]:
        t = self.cfg.trainer
        bar = None
        from .tracking import use_progress_bar

        if use_progress_bar(t.progress_bar) and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.total_steps, initial=self.step_idx, desc="rlkit", dynamic_ncols=True)
        else:  # no bar (progress_bar=false, or output to a file): one short line per step (Tracker.CONSOLE_KEYS)
            self.tracker.console, self.tracker.total_steps = lambda line: print(line, flush=True), t.total_steps
        last: Dict[str, float] = {}
        try:
            while self.step_idx < t.total_steps:
                try:
                    last = self.step()
                except RuntimeError as e:  # a collective a peer never joined (deadlocked rank): name who is behind
                    from .distributed import collective_error, is_collective_timeout

                    if self.world > 1 and is_collective_timeout(e):
                        raise collective_error(e, self.watchdog, t.distributed_timeout_s) from e
                    raise
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.split("/")[0]: f"{last[k]:.3f}" for k in ("reward/mean", "accuracy") if k in last})
                if t.save_every and self.step_idx % t.save_every == 0 and self.step_idx < t.total_steps:
                    self.save_checkpoint()
            if t.save_final and (not ckpt.latest_checkpoint(os.path.join(self.run_dir, "checkpoints"))
                                 or ckpt.step_of(ckpt.latest_checkpoint(os.path.join(self.run_dir, "checkpoints"))) != self.step_idx):
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self.tracker.close()
            self.watchdog.stop()
            self.rollouts.close()
        return last

    @contextmanager
    def _timer(self, name: str, store: Dict[str, float]):
        t0 = time.perf_counter()
        yield
        store[name] = store.get(name, 0.0) + time.perf_counter() - t0

    def _any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        v = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(v, reduction="sum").item() > 0)

    def _max_int(self, n: int) -> int:
        if self.world == 1:
            return n
        v = torch.tensor([float(n)], device=self.acc.device)
        return int(self.acc.gather(v).max().item())

    def _sum(self, x: float) -> float:
        if self.world == 1:
            return x
        return float(self.acc.reduce(torch.tensor([float(x)], device=self.acc.device), reduction="sum").item())

    # ------------------------------------------------------------------- step
    def step(self) -> Dict[str, float]:
        cfg, t = self.cfg, self.cfg.trainer
        step = self.step_idx + 1
        self.watchdog.set(step, "step")
        timings: Dict[str, float] = {}
        ms = MetricSums()
        t_step = time.perf_counter()
        self.rewarder.elapsed = 0.0
        for c in self.controllers:
            c.before_step(self)

        # 1-2. prompts -> rollouts + rewards; pre-advantage filters with refill rounds (rlkit/rollout/stage.py), in-line
        #      or, with rollout.max_staleness >= 1, from rollout workers running ahead (rlkit/rollout/async_driver.py)
        batch, rolled = self.rollouts.next(step, ms, timings)

        # 3. scoring: old/ref log-probs, entropy, values (only what is needed; every rank runs the
        #    scoring forwards, an empty batch included, so collective-bearing forwards stay in step)
        with self._timer("score", timings):
            if self.score_pass:
                self._score(batch)
            if len(batch) and self.kl_fn is not None and cfg.algorithm.kl.placement == "reward":
                self._kl_in_reward(batch, ms)
        with self._timer("advantage", timings):
            if len(batch):
                self.advantage(batch)
                for k, v in self.selector.after_advantage(batch).items():
                    ms.mean(k, v, 1)
            for f in self.post_filters:
                if batch is not None and len(batch):
                    batch = f(batch)
                    for k, v in f.metrics().items():
                        ms.mean(k, v, 1)
                if getattr(f, "rescore_after", False):  # rows kept from earlier steps: re-score at the current weights
                    self._score(batch if batch is not None else parts_empty(self.pad_id))
            if batch is not None and len(batch):
                if batch.token_weights is None:
                    batch.token_weights = torch.ones_like(batch.response_mask)
                for w in self.token_weighting:
                    w(batch)
                    for k, v in (w.metrics() if hasattr(w, "metrics") else {}).items():
                        ms.mean(k, v, 1)
            else:  # a weighting with cross-rank statistics joins its collectives with nothing to contribute
                for w in self.token_weighting:
                    if hasattr(w, "join_empty"):
                        w.join_empty()
        train_batch = batch if batch is not None and len(batch) else None
        for c in self.controllers:  # every rank, even with nothing to train (a controller may run collectives)
            c.before_update(self, train_batch)

        # 4. update (every rank joins, even with nothing to train, so collectives match)
        with self._timer("train", timings):
            updated = self._update(train_batch, ms)
        if updated:
            self.scheduler.step()
        self.rollouts.sync(step, timings)  # the engine (k = 0) or the rollout workers (k >= 1) get version `step`

        # 5. selector update (every rank calls it, with an empty batch if need be, so a selector may use
        #    collectives; it sees all of this step's rollouts, including groups the filters dropped) and controllers
        rolled = [p for p in rolled if p is not None and len(p)]
        sel_batch = Batch.concat(rolled, self.pad_id) if rolled else parts_empty(self.pad_id)
        for k, v in self.selector.update(sel_batch).items():
            ms.mean(k, v, 1)
        if train_batch is not None:
            self._batch_metrics(train_batch, ms)
        self.step_idx = step
        ms.set("lr", self.scheduler.get_last_lr()[0])
        ms.set("world_size", self.world)
        metrics = ms.reduce(self.acc)
        for c in self.controllers:
            metrics.update(c.after_step(self, metrics))
        timings["step"] = time.perf_counter() - t_step
        for k, v in timings.items():
            metrics[f"time/{k}"] = v
        gen_tokens, trained_tokens = metrics.pop("_gen_tokens", 0.0), metrics.pop("_trained_tokens", 0.0)
        self._num_tokens += metrics.pop("_prompt_tokens", 0.0) + gen_tokens
        metrics["num_tokens"] = self._num_tokens  # cumulative prompt + completion tokens (TRL's num_tokens)
        metrics["epoch"] = step * t.prompts_per_step / max(len(self.train_rows), 1)
        metrics["throughput/tokens_per_s"] = (gen_tokens + trained_tokens) / max(timings["step"], 1e-9)
        metrics["throughput/gen_tokens_per_s"] = gen_tokens / max(timings["rollout"], 1e-9)
        self._check_gap(metrics)

        if cfg.eval.every_steps and self.eval_rows and step % cfg.eval.every_steps == 0:
            t0 = time.perf_counter()
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            metrics["time/eval"] = time.perf_counter() - t0
        from .metric_names import rename

        metrics = rename(metrics, t.metric_names)
        self.tracker.log(step, metrics, console=None)
        if t.log_completions and train_batch is not None:
            self._log_completions(step, batch if batch is not None and len(batch) else train_batch)
        return metrics

    # -------------------------------------------------------------- helpers
    def _forward(self, module, mb: Batch, need_entropy: bool, grad: bool, values: bool = False, hidden: bool = False):
        ids, att, (r, p, c) = build_inputs(mb.prompt_ids, mb.response_ids, mb.response_mask, self.pad_id)
        dev = self.acc.device
        args = (ids.to(dev), att.to(dev), r.to(dev), p.to(dev), c.to(dev), tuple(mb.response_ids.shape))
        temp = self.sampling.logprob_temperature
        row_temp = mb.extras.get("logprob_temperature")  # optional per-row [S]; NaN or <= 0 = the default above
        if row_temp is not None:
            row_temp = row_temp.float()
            row_temp = torch.where(torch.isnan(row_temp) | (row_temp <= 0), torch.full_like(row_temp, temp), row_temp)
            temp = row_temp[r].to(dev)
        ctx = nullcontext() if grad else torch.no_grad()
        critic = self.critic
        if not grad:  # no-grad passes skip the DDP wrapper (its forward broadcasts buffers, a collective)
            module, critic = self.acc.unwrap_model(module), (self.acc.unwrap_model(critic) if critic is not None else None)
        with ctx:
            out = module(*args, temperature=temp, need_entropy=need_entropy, return_hidden=hidden)
            v = critic(*args) if values and critic is not None else None
        return out, v

    def _microbatches(self, b: Batch) -> List[List[int]]:
        """Greedy split of rows into micro-batches of at most ``tokens_per_microbatch`` padded tokens."""
        budget = self.cfg.trainer.tokens_per_microbatch
        lens = [len(p) + int(n) for p, n in zip(b.prompt_ids, b.response_lengths.tolist())]
        out, cur, cur_max = [], [], 0
        for i, L in enumerate(lens):
            new_max = max(cur_max, L)
            if cur and new_max * (len(cur) + 1) > budget:
                out.append(cur)
                cur, new_max = [], L
            cur.append(i)
            cur_max = new_max
        if cur:
            out.append(cur)
        return out

    @torch.no_grad()
    def _score(self, batch: Batch) -> None:
        """Fill old (and ref) log-probs, entropy and values.  Rows with a positive
        ``extras["keep_old_logprobs"]`` (replayed experience) keep their stored
        ``old_logprobs`` / ``ref_logprobs``."""
        keep = batch.extras.get("keep_old_logprobs")
        keep = keep > 0 if keep is not None else None  # NaN (row from a batch without the extra) = rescore
        stored = {n: getattr(batch, n) for n in ("old_logprobs", "ref_logprobs")} if keep is not None and keep.any() else {}
        need_ent = "entropy" in self.needs
        lps, ents, vals, refs = [], [], [], []
        micro = self._microbatches(batch) if len(batch) else []
        for k in range(self._max_int(len(micro))):
            if k >= len(micro):  # keep forwards in step across ranks (ZeRO-3 gathers parameters collectively)
                self._forward(self.policy, self._dummy_batch(), False, grad=False)
                continue
            ids = micro[k]
            mb = batch.select(ids)
            T = batch.response_ids.shape[1]
            (lp, ent, _), v = self._forward(self.policy, mb, need_ent, grad=False, values="values" in self.needs)
            pad = lambda x: torch.nn.functional.pad(x.float().cpu(), (0, T - x.shape[1]))  # noqa: E731
            lps.append(pad(lp))
            ents.append(pad(ent))
            if v is not None:
                vals.append(pad(v))
            if "ref_logprobs" in self.needs:
                refs.append(pad(self._ref_logprobs(mb)))
        if not micro:
            return
        order = torch.tensor([i for ids in micro for i in ids])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        batch.old_logprobs = torch.cat(lps)[inv] * batch.response_mask
        if need_ent:
            batch.entropy = torch.cat(ents)[inv] * batch.response_mask
        if vals:
            batch.values = batch.old_values = torch.cat(vals)[inv] * batch.response_mask
        if refs:
            batch.ref_logprobs = torch.cat(refs)[inv] * batch.response_mask
        for name, old in stored.items():
            if old is not None and getattr(batch, name) is not None:
                setattr(batch, name, torch.where(keep[:, None], old, getattr(batch, name)))

    def _ref_logprobs(self, mb: Batch) -> torch.Tensor:
        if self.ref is not None:
            (lp, _, _), _ = self._forward(self.ref, mb, False, grad=False)
            return lp
        lm = self.unwrapped_lm  # LoRA: reference = base model with adapters disabled
        with lm.disable_adapter():
            (lp, _, _), _ = self._forward(self.policy, mb, False, grad=False)
        return lp

    def _kl_in_reward(self, batch: Batch, ms: MetricSums) -> None:
        coef = self.cfg.algorithm.kl.coef
        kl = self.kl_fn(batch.old_logprobs, batch.ref_logprobs) * batch.response_mask
        tr = torch.zeros_like(batch.response_mask)
        last = (batch.response_lengths - 1).clamp(min=0)
        tr[torch.arange(len(batch)), last] = torch.nan_to_num(batch.rewards, nan=0.0)
        batch.token_rewards = (tr - coef * kl) * batch.response_mask
        # token-weighted mean over every real token of the batch, and verl's mean over sequences of the
        # per-sequence token mean (apply_kl_penalty's current_kl); they differ when lengths differ (issue 10, 7d)
        m = batch.response_mask
        n_tok = m.sum(-1)
        ms.mean("kl_reward/token_mean", (kl * m).sum().item(), m.sum().item())
        ms.mean("kl_reward/seq_mean", ((kl * m).sum(-1)[n_tok > 0] / n_tok[n_tok > 0]).sum().item(), (n_tok > 0).sum().item())

    def _update(self, batch: Optional[Batch], ms: MetricSums) -> bool:
        """PPO epochs x mini-batches x micro-batches.  Returns whether any optimizer step was taken."""
        t = self.cfg.trainer
        S = len(batch) if batch is not None else 0
        if not self._any(S > 0):
            ms.mean("train/skipped_empty_steps", 1, 1)
            return False
        stepped = False
        trained_tokens = 0.0
        n_mb, n_steps = self._num_minibatches(S), 0
        first_rank = 1.0 if self.rank == 0 else 0.0
        ms.mean("train/minibatches", n_mb * first_rank, first_rank)  # per epoch
        if n_mb > 1 and not self.score_pass:  # more rows than planned (e.g. replayed experience): old log-probs needed
            self._score(batch if batch is not None else parts_empty(self.pad_id))
        for epoch in range(t.ppo_epochs):
            perm = torch.randperm(S) if S else torch.zeros(0, dtype=torch.long)
            chunks = [c.tolist() for c in torch.tensor_split(perm, n_mb)] if S else [[] for _ in range(n_mb)]
            for mb_rows in chunks:
                mb = batch.select(mb_rows) if mb_rows else None
                micro = self._microbatches(mb) if mb is not None else []
                n_micro = self._max_int(len(micro))
                w_all = mb.weights() if mb is not None else None
                norm = AggNorm(num_tokens=max(self._sum(w_all.sum().item() if mb is not None else 0.0), 1e-8),
                               num_seqs=max(self._sum(float((mb.response_mask.sum(-1) > 0).sum()) if mb is not None else 0.0), 1.0),
                               max_len=self.agg_max_len)  # a constant, never the padded width (issue 10, 7b)
                vnorm = AggNorm(num_tokens=max(self._sum(mb.response_mask.sum().item() if mb is not None else 0.0), 1e-8),
                                num_seqs=norm.num_seqs, max_len=norm.max_len) if self.critic is not None else None
                loss_sum, terms = 0.0, {}
                for k in range(n_micro):
                    if k < len(micro):
                        sub, scale = mb.select(micro[k]), 1.0
                    else:  # keep collectives in step with ranks that have more micro-batches
                        sub, scale = (mb.select([0]) if mb is not None else batch.select([0]) if S else None), 0.0
                    if sub is None:
                        sub, scale = self._dummy_batch(), 0.0
                    if self._deepspeed:  # DeepSpeed steps inside backward: mark the accumulation boundary ourselves
                        self.policy.set_gradient_accumulation_boundary(k == n_micro - 1)
                    sync = self.acc.no_sync(self.policy) if k < n_micro - 1 else nullcontext()
                    with sync:
                        loss, mterms = self._micro_loss(sub, norm, ms if scale else None, first=(epoch == 0), value_norm=vnorm)
                        self.acc.backward(loss * scale * self.world)
                    loss_sum += float(loss.detach()) * scale
                    for key, v in mterms.items():
                        terms[key] = terms.get(key, 0.0) + float(v) * scale
                    if scale:
                        trained_tokens += sub.num_tokens
                # with clipping off the norm is still measured (clip at inf): a NaN/inf norm skips the update either way
                grad_norm = self.acc.clip_grad_norm_(self.policy.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
                gn = float(grad_norm) if grad_norm is not None else 0.0
                if self.critic is not None:  # the critic's grads (not clipped with the policy's) must be finite too
                    cn = float(torch.nn.utils.get_total_norm([p.grad for p in self.critic.parameters() if p.grad is not None]))
                    gn = gn if math.isfinite(cn) else cn
                if not math.isfinite(gn) or not math.isfinite(loss_sum):
                    self.optimizer.zero_grad(set_to_none=True)
                    ms.mean("train/skipped_nonfinite", 1, 1)
                    log.warning("step %d: non-finite loss (%s) or grad norm (%s): update skipped", self.step_idx + 1, loss_sum, gn)
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                stepped = True
                n_steps += 1
                ms.mean("grad_norm", gn, 1)
                first_rank = 1.0 if self.rank == 0 else 0.0  # sums over ranks, counted once per mini-batch
                ms.mean("loss/total", loss_sum, first_rank)
                for key, v in terms.items():
                    ms.mean(f"loss/{key}", v, first_rank)
        ms.total("_trained_tokens", trained_tokens)
        ms.mean("train/optimizer_steps", n_steps * first_rank, first_rank)
        return stepped

    def _num_minibatches(self, S: int) -> int:
        """Optimizer steps per epoch for ``S`` local rows.  With ``trainer.samples_per_minibatch`` set it follows the
        rows actually trained (ceil(S x world / samples_per_minibatch), the max over ranks so collectives stay in
        step): a filter that adds rows (EFRame replay) adds steps; unset, the whole step is one mini-batch."""
        mb = self.cfg.trainer.samples_per_minibatch
        if not mb:
            return self.num_minibatches
        return max(1, self._max_int(math.ceil(S * self.world / mb)))

    def _dummy_batch(self) -> Batch:
        r = self.train_rows[0]
        return Batch(prompt_ids=[r["prompt_ids"]], response_ids=torch.full((1, 1), self.pad_id), response_mask=torch.ones(1, 1),
                     group_ids=torch.zeros(1, dtype=torch.long), advantages=torch.zeros(1, 1), token_weights=torch.zeros(1, 1),
                     rollout_logprobs=torch.zeros(1, 1))

    def _micro_loss(self, mb: Batch, norm: AggNorm, ms: Optional[MetricSums], first: bool,
                    value_norm: Optional[AggNorm] = None):
        """Loss of one micro-batch, already divided by the mini-batch's global normalisers.  ``norm`` counts
        the token weights the policy terms sum over; ``value_norm`` counts the response mask the value loss
        sums over (they differ under token weighting)."""
        a = self.cfg.algorithm
        dev = self.acc.device
        need_values = self.critic is not None and mb.returns is not None
        (logp, ent, hidden), values = self._forward(self.policy, mb, need_entropy=True, grad=True, values=need_values,
                                                    hidden=self.need_hidden)
        mask = mb.response_mask.to(dev)
        w = mb.weights().to(dev)
        old = mb.old_logprobs.to(dev) if mb.old_logprobs is not None else logp.detach()
        is_w = None
        if self.tis_cap is not None and mb.rollout_logprobs is not None:  # at k >= 1 never None (async_driver)
            ratio = torch.exp(old - mb.rollout_logprobs.to(dev)).detach()
            is_w = ratio.clamp(max=self.tis_cap) * mask
            if ms is not None:
                self.rollouts.is_metrics(ms, ratio, mask)
        inp = LossInputs(logprobs=logp, old_logprobs=old, advantages=mb.advantages.to(dev), mask=w,
                         rollout_is_weights=is_w, entropy=ent if self.need_entropy_grad else ent.detach())
        loss_mat, pl_metrics = self.policy_loss(inp)
        loss = self.aggregate(loss_mat, w, norm)
        terms: Dict[str, torch.Tensor] = {"policy": loss.detach()}
        if self.kl_fn is not None and a.kl.placement == "loss":
            ref = mb.ref_logprobs.to(dev) if mb.ref_logprobs is not None else self._ref_logprobs(mb).to(dev)
            kl = self.kl_fn(logp, ref)
            kl_loss = self.aggregate(kl, w, norm)
            loss = loss + a.kl.coef * kl_loss
            terms["kl"] = kl_loss.detach()
            if ms is not None:
                ms.masked("kl", kl, mask)
        if a.entropy_coef:
            e_loss = self.aggregate(ent, w, norm)
            loss = loss - a.entropy_coef * e_loss
            terms["entropy"] = e_loss.detach()  # logged as loss/entropy (the bonus is -entropy_coef x this)
        fwd = ForwardOutput(logprobs=logp, entropy=ent, hidden=hidden, lm_head=self.unwrapped_lm.get_output_embeddings(),
                            temperature=self.sampling.logprob_temperature, model=self.unwrapped_lm)
        for i, reg in enumerate(self.regularizers):
            r_mat, r_metrics = reg(inp, fwd, mb)
            r_loss = self.aggregate(r_mat, w, norm)
            loss = loss + r_loss
            terms[f"reg{i}_{type(reg).plugin_name}"] = r_loss.detach()
            if ms is not None:
                for k, v in r_metrics.items():
                    self._metric(ms, k, v, mask)
        if values is not None:
            from .objectives.gae import value_loss

            v_mat = value_loss(values, mb.old_values.to(dev), mb.returns.to(dev), mask, a.critic.cliprange_value)
            v_loss = self.aggregate(v_mat, mask, value_norm if value_norm is not None else norm)
            loss = loss + a.critic.value_loss_coef * v_loss
            terms["value"] = v_loss.detach()
            if ms is not None:
                ms.masked("critic/values", values, mask)
        if ms is not None:
            for k, v in pl_metrics.items():
                self._metric(ms, k, v, mask)
            for k, how in getattr(self.policy_loss, "metric_extremes", {}).items():  # a micro-batch's fraction
                if k in pl_metrics and mask.sum() > 0:
                    frac = float((pl_metrics[k] * mask).sum() / mask.sum())
                    (ms.min if how == "min" else ms.max)(f"{k}/{how}", frac)
            ms.masked("entropy", ent, mask)
            if first and mb.rollout_logprobs is not None:
                base = mb.old_logprobs.to(dev) if mb.old_logprobs is not None else logp.detach()
                gap = (base - mb.rollout_logprobs.to(dev)).abs()
                fresh = mb.extras.get("rollout_step")  # only rows sampled this step measure the weight sync
                gmask = mask if fresh is None else mask * (fresh.to(dev) == self.step_idx + 1)[:, None]
                other_t = mb.extras.get("no_gap_check")  # rows sampled at another temperature than they are scored at
                if other_t is not None:
                    gmask = gmask * (~(other_t.to(dev) > 0))[:, None]
                gmask = self.rollouts.gap_mask(mb, gmask, gap, ms)  # k >= 1: only rows of the current version
                ms.masked("logprob_gap", gap, gmask, extremes=True)
        return loss, terms

    @staticmethod
    def _metric(ms: MetricSums, k: str, v, mask) -> None:
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            ms.masked(k, v, mask)
        else:
            ms.mean(k, float(v), 1)

    def _batch_metrics(self, b: Batch, ms: MetricSums) -> None:
        mask = b.response_mask
        if b.advantages is not None:
            ms.masked("advantage", b.advantages, mask, extremes=True)
            adv_std = b.advantages[mask.bool()].std().item() if mask.sum() > 1 else 0.0
            ms.mean("advantage/std", adv_std, 1)
        ms.mean("train/samples", len(b), 1)
        ms.mean("train/kept_token_frac", (b.weights() > 0).float().sum().item(), mask.sum().item())

    def _check_gap(self, metrics: Dict[str, float]) -> None:
        from .rollout.gap import check_logprob_gap

        self._gap_baseline = check_logprob_gap(metrics.get("logprob_gap/mean"), self.cfg.rollout,
                                               getattr(self, "_gap_baseline", None), self.step_idx)

    def _log_completions(self, step: int, b: Batch) -> None:
        from accelerate.utils import gather_object

        rows = []
        adv = b.advantages
        for i in range(len(b)):
            rows.append({
                "group": int(b.group_ids[i]), "prompt": b.info.get("prompt", [None] * len(b))[i],
                "completion": b.info["completion"][i], "reward": float(b.rewards[i]) if b.rewards is not None else None,
                **{f"reward/{k}": float(v[i]) for k, v in b.reward_components.items()},
                "answer": b.info.get("answer", [None] * len(b))[i], "finish_reason": b.info["finish_reason"][i],
                "length": int(b.response_lengths[i]),
                "advantage": float(adv[i][b.response_mask[i].bool()].mean()) if adv is not None and b.response_lengths[i] > 0 else None,
                **({"spans": b.info["spans"][i]} if "spans" in b.info else {}),  # multi-turn: policy / observation spans
            })
        if self.world > 1:
            rows = gather_object(rows)
        self.tracker.log_completions(step, rows)

    # ------------------------------------------------------------------- eval
    def evaluate(self) -> Dict[str, float]:
        from .evaluation import evaluate_rows

        e = self.cfg.eval
        rows = self.eval_rows[: e.max_prompts] if e.max_prompts else self.eval_rows
        share = rows[self.rank::self.world]
        res = evaluate_rows(self.engine, share, e, max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens,
                            stop=self.cfg.rollout.stop, seed=self.cfg.trainer.seed, raw=True)
        return merge_eval(res, self.acc)


def _cpu_distributed() -> bool:
    """Several processes but no GPU (``accelerate launch --multi_gpu`` / ``torchrun`` on a CPU machine):
    ask accelerate for its MULTI_CPU mode, which joins the processes with gloo.  ``accelerate launch --cpu``
    alone starts one process (it needs an MPI hostfile for more)."""
    return (os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true")


def merge_eval(res, acc) -> Dict[str, float]:
    from .evaluation import summarize

    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        res = gather_object(res)
    return summarize(res)
