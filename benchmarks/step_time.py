#!/usr/bin/env python
"""Seconds per GRPO step, split by stage: rlkit, and TRL's ``GRPOTrainer`` on the same workload when ``trl`` is installed.

    python benchmarks/step_time.py --steps 10 --warmup 2 [--threads 1] [--clock wall|cpu] [--json OUT] [--no-trl]
                                   [--no-k1] [--reward-isolation process|thread|none]

The workload is fixed: 8 prompts x 8 samples = 64 completions per step, exactly 32 new tokens each
(``min_new_tokens = max_new_tokens = 32`` in the model's generation config, so no completion stops at EOS),
the 2-layer random-init toy Llama of ``rlkit.toy`` (``--size tiny``: hidden 64, vocab 46), the toy echo
reward (``rewards/toy.py:echo``), temperature 1.0, no KL (no reference model), one PPO epoch and one
mini-batch, i.e. exactly one optimizer step per RL step, fp32 on CPU.  Every step uses the same 8 prompts.
The script checks these invariants on every timed step of both trainers (and that both moved the weights)
and exits 1 if one fails.  Masking EOS makes the sampling distribution differ from the full softmax by
log(1 - p_eos), so rlkit's ``logprob_gap/mean`` reads about 0.016 here instead of ~0; that is expected.

Both trainers are built from the same weights in this one process, use the same ``torch.set_num_threads``
and run interleaved step by step (TRL step, rlkit step, TRL step, ...: rlkit's step runs inside a TRL
``on_step_end`` callback, outside TRL's clock), so load from other processes on a shared machine hits both
alike.  The first ``--warmup`` steps of each are not timed.

Per-step time is wall clock (``--clock cpu``: process CPU seconds over all threads, for every timer
including rlkit's own ``time/*``; far less sensitive to other processes on a shared machine).  rlkit: the
``Trainer.step()`` call.  TRL: from the end of its previous step (after rlkit's step returned) to its next
``on_step_end``, so it covers data loading, generation, reward, loss, backward, optimizer and TRL's metric
bookkeeping.  Stages: rlkit's ``time/*`` metrics; for TRL the time
inside its methods ``_generate`` (rollout), ``_calculate_rewards`` (reward), ``_generate_and_score_completions``
minus those two (advantage: padding, advantages, metric gathers), ``training_step`` minus ``_prepare_inputs``
plus ``_clip_grad_norm`` plus ``optimizer.step`` (train); TRL has no separate scoring pass or weight sync in
this setting.  ``other`` is the step minus the named stages.

The ``k=1`` column (``--no-k1`` skips it; needs ``rollout.max_staleness``): the same rlkit workload with
``rollout.max_staleness=1`` and one local rollout worker process (``--threads`` threads for the trainer, the worker's
threads as rlkit/rollout/workers.py splits the cores: 1 + 1 on 2 cores).  It runs after the interleaved phase, on its
own (interleaved, the worker's background generation would run inside TRL's timed step), and then rlkit k=0 once more
on its own (``k=0 seq``) as a check on load drift.  At k=1 ``rollout`` and ``reward`` are the worker's time, overlapped
with the step, and the trainer's own stages are ``wait_for_rollout`` and ``weight_transfer``.  Because the worker's
CPU time is not in the trainer's process, the script also reads it (psutil, children of this process) and prints
the larger of the two per-step CPU times: what a k=1 step takes on idle cores.  ``--clock cpu`` skips the column.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 32
STAGES = ["rollout", "reward", "score", "advantage", "train", "weight_sync", "wait_for_rollout", "weight_transfer", "other"]
WORKER_STAGES = ("rollout", "reward")   # at k >= 1 these run in the rollout worker, off the trainer's clock
# our aggregation <-> TRL loss_type with the same per-token normalisation
LOSS_TYPES = {"grpo": "seq_mean_token_mean", "dapo": "token_mean"}


# ------------------------------------------------------------------ workload
def make_model_dir(root: str, size: str) -> str:
    """The toy model (seed 0) with ``min_new_tokens = NEW_TOKENS`` in its generation config."""
    from transformers import GenerationConfig

    from rlkit.toy import make_model_dir as make

    path = make(os.path.join(root, f"toy-{size}"), size, seed=0)
    gc = GenerationConfig.from_pretrained(path)
    gc.min_new_tokens = NEW_TOKENS
    gc.save_pretrained(path)
    return path


def prompt_rows() -> List[Dict[str, str]]:
    from rlkit.toy import echo_rows

    return echo_rows(PROMPTS, seed=0)


def weights_changed(initial, model) -> bool:
    """Whether training moved the weights (a trainer that silently skips its updates would look fast)."""
    return any(not torch.equal(a, b.detach()) for a, b in zip(initial, model.parameters()))


def summarize_lengths(lengths: List[int]) -> Dict[str, float]:
    return {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)} if lengths else {}


# --------------------------------------------------------------------- rlkit
class RlkitRunner:
    """An in-process rlkit ``Trainer`` on the workload; ``step()`` runs and records one RL step."""

    def __init__(self, model_dir: str, rows, args, workdir: str, staleness: int = 0):
        from rlkit.config import load_config
        from rlkit.trainer import Trainer

        self.args, self.k = args, staleness
        overrides = {
            "model.name_or_path": model_dir,
            "model.dtype": "float32",
            "data.prompt_field": "question",
            "data.answer_field": "answer",
            "data.max_prompt_tokens": 64,
            "rollout.samples_per_prompt": SAMPLES,
            "rollout.max_new_tokens": NEW_TOKENS,
            "rollout.temperature": 1.0,
            "reward.functions": "[" + str(REPO / "rewards" / "toy.py") + ":echo]",
            "algorithm.advantage": "grpo",
            "algorithm.policy_loss": "ppo_clip",
            "algorithm.aggregation": LOSS_TYPES[args.loss_type],
            "algorithm.kl.coef": 0.0,
            "trainer.prompts_per_step": PROMPTS,
            "trainer.ppo_epochs": 1,
            "trainer.total_steps": args.warmup + args.steps,
            "trainer.lr": args.lr,
            "trainer.max_grad_norm": 1.0,
            "trainer.lr_schedule": "constant",
            "trainer.output_dir": workdir,
            "trainer.run_name": "bench",
            "trainer.progress_bar": False,
            "trainer.log_with": [],
            "trainer.log_completions": False,
            "trainer.save_final": False,
        }
        if args.reward_isolation:
            overrides["reward.isolation"] = args.reward_isolation
        if staleness:  # one local rollout worker; its threads: rollout.worker_threads if the config has it
            overrides.update({"rollout.max_staleness": staleness, "rollout.num_workers": 1, "trainer.run_name": f"bench_k{staleness}"})
            if has_rollout_key("worker_threads"):
                overrides["rollout.worker_threads"] = args.threads
        cfg = load_config([f"{k}={v}" for k, v in overrides.items()])  # trainer.mixed_precision defaults to "no"
        self.tr = Trainer(cfg, train_rows=[dict(r) for r in rows])
        self.initial = [p.detach().clone() for p in self.tr.unwrapped_lm.parameters()]
        self.opt_steps = 0
        inner = getattr(self.tr.optimizer, "optimizer", self.tr.optimizer)  # accelerate wraps the torch optimizer
        inner.register_step_post_hook(self._count)
        self.steps: List[Dict[str, Any]] = []

    def _count(self, *_):
        self.opt_steps += 1

    def step(self) -> Dict[str, Any]:
        torch.set_num_threads(self.args.threads)
        before = self.opt_steps
        w0 = children_cpu() if self.k else 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        m = self.tr.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        cpu_worker = children_cpu() - w0 if self.k else 0.0
        st = {k: float(m.get(f"time/{k}", 0.0)) for k in STAGES if k != "other"}
        st["other"] = wall - sum(v for k, v in st.items() if not (self.k and k in WORKER_STAGES))
        rec = {
            "step": wall, "cpu": cpu, "cpu_worker": cpu_worker, **st, "warmup": len(self.steps) < self.args.warmup,
            "completions": float(m.get("train/samples", float("nan"))), "optimizer_steps": self.opt_steps - before,
            "length_min": m.get("response_length/min"), "length_max": m.get("response_length/max"),
            "length_mean": m.get("response_length/mean"), "logprob_gap": m.get("logprob_gap/mean"),
            "reward_mean": m.get("reward/mean"),
        }
        self.steps.append(rec)
        return rec

    def info(self) -> Dict[str, Any]:
        tr = self.tr
        return {"score_pass": bool(tr.score_pass), "minibatches": tr.num_minibatches,
                "weights_changed": weights_changed(self.initial, tr.unwrapped_lm),
                "param_dtypes": sorted({str(p.dtype) for p in tr.unwrapped_lm.parameters()}),
                "mixed_precision": str(tr.acc.mixed_precision), "threads_after": torch.get_num_threads(),
                **({"max_staleness": self.k, "worker_threads": worker_threads(self.args.threads)} if self.k else {})}

    def close(self) -> None:
        rollouts = getattr(self.tr, "rollouts", None)
        if rollouts is not None and hasattr(rollouts, "close"):
            rollouts.close()   # rollout workers exit (Trainer.train does this; step() alone does not)


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's live children: the rollout worker of a k >= 1 trainer."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for c in psutil.Process().children(recursive=True):
        try:
            t = c.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def has_rollout_key(name: str) -> bool:
    from rlkit.config import RolloutConfig

    return name in getattr(RolloutConfig, "__dataclass_fields__", {})


def worker_threads(trainer_threads: int) -> int:
    """Threads of the local rollout worker: ``rollout.worker_threads`` (set to ``--threads`` here) if the config has the
    key, else rlkit/rollout/workers.py's ``thread_split`` of this machine's cores."""
    if has_rollout_key("worker_threads"):
        return trainer_threads
    from rlkit.rollout.workers import thread_split

    return thread_split(1)[1]


# ----------------------------------------------------------------------- TRL
def trl_available() -> bool:
    try:
        import trl  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 (a broken install counts as absent)
        return False


class TRLRunner:
    """TRL ``GRPOTrainer`` on the same workload.  ``train(between)`` runs all its steps and calls
    ``between()`` after each one (outside TRL's clock), which interleaves the two trainers step by step."""

    def __init__(self, model_dir: str, rows, args, workdir: str):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl import GRPOConfig, GRPOTrainer

        from rewards.toy import echo

        self.args = args
        n = args.warmup + args.steps
        # the same 8 prompts, in the same order, once per step (no shuffling: step k = rows 8k..8k+7)
        ds = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for _ in range(n) for r in rows])
        self.batches: List[Dict[str, Any]] = []

        def echo_reward(completions, answer, completion_ids=None, **kwargs):  # the same function rlkit calls
            self.batches.append({"n": len(completions), "lengths": [len(c) for c in completion_ids]})
            return echo(completions, answer)

        echo_reward.__name__ = "echo"
        self.cfg = GRPOConfig(
            output_dir=os.path.join(workdir, "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1, num_generations=SAMPLES,
            max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, scale_rewards="group",
            loss_type=args.loss_type, mask_truncated_completions=False, disable_dropout=True,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=n, seed=42,
            shuffle_dataset=False, dataloader_num_workers=0, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        self.initial = [p.detach().clone() for p in model.parameters()]
        self.trainer = GRPOTrainer(model=model, reward_funcs=echo_reward, args=self.cfg, train_dataset=ds, processing_class=tok)
        for cb in (PrinterCallback, ProgressCallback):  # the end-of-training summary print
            self.trainer.remove_callback(cb)
        self.acc: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        for name in ("training_step", "_prepare_inputs", "_generate_and_score_completions", "_generate",
                     "_calculate_rewards", "_clip_grad_norm", "_get_per_token_logps_and_entropies"):
            self._wrap(name)
        self.steps: List[Dict[str, Any]] = []

    def _wrap(self, name: str) -> None:
        orig = getattr(self.trainer, name)
        acc, calls = self.acc, self.calls

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                acc[name] += time.perf_counter() - t
                calls[name] += 1

        setattr(self.trainer, name, timed)  # instance attribute: TRL calls these as self.<name>(...)

    def train(self, between=None) -> None:
        from transformers import TrainerCallback

        runner, acc, calls, args = self, self.acc, self.calls, self.args

        class StepTimer(TrainerCallback):
            resume = resume_cpu = 0.0
            t_opt = 0.0

            def on_train_begin(self, *a, **kw):
                self.resume, self.resume_cpu = time.perf_counter(), time.process_time()

            def on_step_begin(self, *a, **kw):
                torch.set_num_threads(args.threads)

            def on_pre_optimizer_step(self, *a, **kw):
                self.t_opt = time.perf_counter()

            def on_optimizer_step(self, *a, **kw):
                acc["optimizer.step"] += time.perf_counter() - self.t_opt
                calls["optimizer.step"] += 1

            def on_step_end(self, *a, **kw):
                wall, cpu = time.perf_counter() - self.resume, time.process_time() - self.resume_cpu
                a_, c_ = dict(acc), dict(calls)
                acc.clear()
                calls.clear()
                g = lambda k: a_.get(k, 0.0)  # noqa: E731
                st = {"rollout": g("_generate"), "reward": g("_calculate_rewards"), "score": 0.0,
                      "advantage": g("_generate_and_score_completions") - g("_generate") - g("_calculate_rewards"),
                      "train": g("training_step") - g("_prepare_inputs") + g("_clip_grad_norm") + g("optimizer.step"),
                      "weight_sync": 0.0, "wait_for_rollout": 0.0, "weight_transfer": 0.0}
                st["other"] = wall - sum(st.values())
                b = runner.batches[-1] if runner.batches else {"n": 0, "lengths": []}
                lens = summarize_lengths(b["lengths"])
                runner.steps.append({
                    "step": wall, "cpu": cpu, **st, "warmup": len(runner.steps) < args.warmup, "completions": float(b["n"]),
                    "optimizer_steps": c_.get("optimizer.step", 0),
                    "logprob_forwards": c_.get("_get_per_token_logps_and_entropies", 0),
                    "length_min": lens.get("min"), "length_max": lens.get("max"), "length_mean": lens.get("mean"),
                })
                if between is not None:
                    between()
                # TRL's next interval starts after the other trainer's step
                self.resume, self.resume_cpu = time.perf_counter(), time.process_time()

        self.trainer.add_callback(StepTimer())
        torch.set_num_threads(args.threads)
        self.trainer.train()

    def info(self) -> Dict[str, Any]:
        t, c = self.trainer, self.cfg
        opt = getattr(t.optimizer, "optimizer", t.optimizer)
        return {"weights_changed": weights_changed(self.initial, t.model), "loss_type": c.loss_type,
                "steps_per_generation": c.steps_per_generation,
                "generation_batch_size": c.generation_batch_size, "gradient_checkpointing": c.gradient_checkpointing,
                "param_dtypes": sorted({str(p.dtype) for p in t.model.parameters()}),
                "mixed_precision": str(t.accelerator.mixed_precision), "device": str(t.accelerator.device),
                "optimizer": type(opt).__name__, "threads_after": torch.get_num_threads()}


# ------------------------------------------------------------------- report
def timed(steps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [s for s in steps if not s["warmup"]]


def stat(steps: List[Dict[str, Any]], fn) -> Dict[str, float]:
    t = timed(steps)
    return {k: fn([s[k] for s in t]) for k in STAGES + ["step", "cpu"]} if t else {}


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "accelerate", "datasets", "trl"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        out["rlkit"] = (rev or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        out["rlkit"] = "unknown"
    return out


def check(name: str, steps: List[Dict[str, Any]]) -> List[str]:
    """Fairness invariants of every timed step; returns the violations."""
    bad = []
    for i, s in enumerate(steps):
        if s["warmup"]:
            continue
        if s["completions"] != PROMPTS * SAMPLES:
            bad.append(f"{name} step {i}: {s['completions']} completions, want {PROMPTS * SAMPLES}")
        if s["optimizer_steps"] != 1:
            bad.append(f"{name} step {i}: {s['optimizer_steps']} optimizer steps, want 1")
        if s["length_min"] != NEW_TOKENS or s["length_max"] != NEW_TOKENS:
            bad.append(f"{name} step {i}: completion lengths {s['length_min']}..{s['length_max']}, want {NEW_TOKENS}")
        if s.get("logprob_forwards", 1) != 1:
            bad.append(f"{name} step {i}: {s['logprob_forwards']} log-prob forwards, want 1 (no separate old-logprob pass)")
    return bad


def table(cols: Dict[str, Dict[str, float]], mins: Dict[str, Dict[str, float]], cpu_row: bool = True) -> str:
    """One column per contender (median), ratios to TRL when present, then the minima."""
    def ratio(a, b):
        return f"{a / b:>10.2f}" if b > 1e-4 else f"{'-':>10}"

    names = list(cols)
    others = [n for n in names if n != "TRL"] if "TRL" in cols else []
    head = f"{'stage':<16} " + " ".join(f"{n:>9}" for n in names)
    head += "".join(f" {n + '/TRL':>10}" for n in others)
    head += "   | min: " + " ".join(f"{n:>9}" for n in names)
    lines = [head, "-" * len(head)]
    for k in STAGES + ["step"] + (["cpu"] if cpu_row else []):
        if k == "step":
            lines.append("-" * len(head))
        row = f"{k if k != 'cpu' else 'step CPU-s':<16} " + " ".join(f"{cols[n].get(k, float('nan')):>9.4f}" for n in names)
        row += "".join(ratio(cols[n][k], cols["TRL"][k]) if k in cols[n] else f"{'-':>10}" for n in others)
        row += "   |      " + " ".join(f"{mins[n].get(k, float('nan')):>9.4f}" for n in names)
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, per trainer")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both trainers (default 1: see benchmarks/README.md)")
    p.add_argument("--size", default="tiny", help="rlkit.toy size (tiny: 2 layers, hidden 64)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="grpo",
                   help="TRL loss_type; rlkit runs the matching aggregation (grpo: seq_mean_token_mean, dapo: token_mean)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: time.perf_counter; cpu: every timer (ours, TRL's, rlkit's time/*) reads time.process_time, "
                        "the process's CPU seconds over all threads, which other processes on a shared machine barely change")
    p.add_argument("--no-trl", action="store_true", help="time rlkit only")
    p.add_argument("--no-k1", action="store_true", help="skip the rollout.max_staleness=1 column")
    p.add_argument("--reward-isolation", choices=["process", "thread", "none"], default=None,
                   help="reward.isolation of every rlkit column (default: rlkit's default, process)")
    p.add_argument("--json", metavar="OUT", help="write settings, versions, per-step times and summaries here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (TRL's first step includes its start-up)")

    import logging
    import warnings

    logging.getLogger("rlkit").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":  # rlkit's trainer and the TRL wrappers above all call time.perf_counter
        time.perf_counter = time.process_time
    with_trl = not args.no_trl and trl_available()
    with_k1 = not args.no_k1 and args.clock == "wall" and has_rollout_key("max_staleness")
    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"threads: torch.set_num_threads({args.threads}) for both (os.cpu_count()={os.cpu_count()}, "
          f"interop threads {torch.get_num_interop_threads()})")
    print(f"workload: {PROMPTS} prompts x {SAMPLES} samples = {PROMPTS * SAMPLES} completions/step, {NEW_TOKENS} new tokens, "
          f"toy:{args.size} fp32, lr {args.lr}, TRL loss_type={args.loss_type} <-> rlkit aggregation={LOSS_TYPES[args.loss_type]}, "
          f"{args.warmup} warm-up + {args.steps} timed steps each, {args.clock} clock"
          + (", interleaved step by step (TRL, rlkit, TRL, ...)" if with_trl else ""))
    if not with_trl:
        print("TRL: " + ("skipped (--no-trl)" if args.no_trl else "not importable; `pip install trl==1.16.0` to compare"))
    if with_k1:
        print(f"k=1: rollout.max_staleness=1, one local rollout worker with {worker_threads(args.threads)} thread(s), trainer "
              f"{args.threads}; run after the interleaved phase on its own (its worker generates in the background, which "
              "would slow an interleaved trainer), then rlkit k=0 again on its own ('k=0 seq') as a check on load drift")
    else:
        print("k=1: " + ("skipped (--no-k1)" if args.no_k1 else "skipped (--clock cpu counts the trainer process only, not "
                         "its rollout worker)" if args.clock != "wall" else "skipped (this rlkit has no rollout.max_staleness)"))

    def progress(i, o, t=None):
        msg = f"  step {i + 1:>3}{' (warm-up)' if i < args.warmup else ''}: rlkit {o['step']:.3f}s"
        if t is not None:
            msg += f"  TRL {t['step']:.3f}s"
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="rlkit_bench_") as tmp:
        os.environ["RLKIT_CACHE"] = os.path.join(tmp, "cache")
        model_dir = make_model_dir(tmp, args.size)
        rows = prompt_rows()
        ours = RlkitRunner(model_dir, rows, args, os.path.join(tmp, "rlkit"))
        theirs = None
        if with_trl:
            theirs = TRLRunner(model_dir, rows, args, os.path.join(tmp, "trl"))

            def between():
                o = ours.step()
                progress(len(ours.steps) - 1, o, theirs.steps[-1])

            theirs.train(between)
        else:
            for i in range(args.warmup + args.steps):
                progress(i, ours.step())
        infos = {"rlkit": ours.info(), **({"trl": theirs.info()} if theirs else {})}
        runs = {"rlkit": ours.steps, **({"trl": theirs.steps} if theirs else {})}
        loads = {"interleaved": os.getloadavg()[0]}
        if with_k1:
            k1 = RlkitRunner(model_dir, rows, args, os.path.join(tmp, "rlkit_k1"), staleness=1)
            try:
                for i in range(args.warmup + args.steps):
                    o = k1.step()
                    print(f"  k=1 step {i + 1:>3}{' (warm-up)' if i < args.warmup else ''}: {o['step']:.3f}s", file=sys.stderr,
                          flush=True)
                infos["rlkit_k1"] = k1.info()
            finally:
                k1.close()
            runs["rlkit_k1"] = k1.steps
            loads["k1"] = os.getloadavg()[0]
            seq = RlkitRunner(model_dir, rows, args, os.path.join(tmp, "rlkit_seq"))
            for i in range(args.warmup + args.steps):
                o = seq.step()
                print(f"  k=0 seq step {i + 1:>3}{' (warm-up)' if i < args.warmup else ''}: {o['step']:.3f}s", file=sys.stderr,
                      flush=True)
            runs["rlkit_seq"] = seq.steps
            infos["rlkit_seq"] = seq.info()
            loads["k0_seq"] = os.getloadavg()[0]

    problems = [p for who in runs for p in check(who, runs[who])]
    problems += [f"{who}: the weights never changed" for who, info in infos.items() if not info["weights_changed"]]
    med_o, min_o = stat(runs["rlkit"], statistics.median), stat(runs["rlkit"], min)
    med_t = stat(runs["trl"], statistics.median) if theirs else None
    min_t = stat(runs["trl"], min) if theirs else None
    print()
    print(f"{'wall' if args.clock == 'wall' else 'CPU'} seconds per step: median (and min) over {len(timed(runs['rlkit']))} "
          f"timed steps per trainer; stage medians need not add up to the step median"
          + ("; 'step CPU-s' = process CPU time per step (all threads)" if args.clock == "wall" else ""))
    label = {"rlkit": "k=0", "trl": "TRL", "rlkit_k1": "k=1", "rlkit_seq": "k=0 seq"}
    cols = {label[w]: stat(runs[w], statistics.median) for w in runs}
    mins = {label[w]: stat(runs[w], min) for w in runs}
    print(table(cols, mins, cpu_row=args.clock == "wall"))
    if with_k1:
        print("k=1: rollout and reward are the worker's time (overlapped, not part of the step); 'other' excludes them")
    ratio = paired = None
    if theirs:
        ratio = med_o["step"] / med_t["step"]
        pairs = [o["step"] / t["step"] for o, t in zip(runs["rlkit"], runs["trl"]) if not o["warmup"]]
        paired = statistics.median(pairs)
        print(f"\nrlkit / TRL step time: {ratio:.2f}x (ratio of medians); {paired:.2f}x (median of per-step ratios, "
              f"adjacent steps); {min_o['step'] / min_t['step']:.2f}x (ratio of minima)"
              + (f"; {med_o['cpu'] / med_t['cpu']:.2f}x (CPU time, ratio of medians)" if args.clock == "wall" else ""))
    k1_ratio = None
    if "rlkit_k1" in runs:
        m1 = cols["k=1"]["step"]
        k1_ratio = m1 / med_t["step"] if theirs else None
        cw = statistics.median([s["cpu_worker"] for s in timed(runs["rlkit_k1"])])
        crit = max(cols["k=1"]["cpu"], cw)
        print(f"CPU seconds per step, k=1: trainer {cols['k=1']['cpu']:.4f}, rollout worker {cw:.4f}; on idle cores a k=1 step "
              f"takes about the larger, {crit:.4f}: " + (f"{crit / med_t['cpu']:.2f}x TRL's CPU seconds per step, " if theirs else "")
              + f"{crit / med_o['cpu']:.2f}x rlkit k=0's (a load-independent estimate)")
        print(f"rlkit k=1 step time: {m1:.4f}s; "
              + (f"{k1_ratio:.2f}x TRL (target <= 0.5x); " if theirs else "")
              + f"{m1 / med_o['step']:.2f}x rlkit k=0 interleaved, {m1 / cols['k=0 seq']['step']:.2f}x k=0 seq "
              f"(load average at the end of each phase: " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()) + ")")
    for who, info in infos.items():
        print(f"{who}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    gaps = [s["logprob_gap"] for s in timed(runs["rlkit"]) if s.get("logprob_gap") is not None]
    if gaps:
        print(f"rlkit logprob_gap/mean (rollout vs trainer): median {statistics.median(gaps):.4f}")
    if problems:
        print("\nFAIRNESS CHECK FAILED:\n  " + "\n  ".join(problems[:20]))
    else:
        print(f"fairness: every timed step of {', '.join(runs)} had {PROMPTS * SAMPLES} completions of "
              f"exactly {NEW_TOKENS} tokens and one optimizer step" + (", and TRL ran one log-prob forward" if theirs else ""))

    if args.json:
        out = {"versions": vers, "threads": args.threads, "cpu_count": os.cpu_count(), "clock": args.clock,
               "workload": {"prompts": PROMPTS, "samples_per_prompt": SAMPLES, "new_tokens": NEW_TOKENS, "model": f"toy:{args.size}",
                            "lr": args.lr, "trl_loss_type": args.loss_type, "rlkit_aggregation": LOSS_TYPES[args.loss_type],
                            "warmup": args.warmup, "steps": args.steps, "interleaved": bool(theirs)},
               "median_s": {"rlkit": med_o, **({"trl": med_t} if theirs else {})},
               "min_s": {"rlkit": min_o, **({"trl": min_t} if theirs else {})},
               "ratio_rlkit_over_trl": ratio, "paired_ratio_median": paired, "ratio_k1_over_trl": k1_ratio,
               "median_s_all": cols, "min_s_all": mins, "load_average": loads,
               "info": infos, "per_step": runs, "fairness_problems": problems}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
