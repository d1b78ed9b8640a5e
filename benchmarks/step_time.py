#!/usr/bin/env python
"""Seconds per GRPO step, split by stage: rlkit, and TRL's ``GRPOTrainer`` on the same workload when ``trl`` is installed.

    python benchmarks/step_time.py --steps 10 --warmup 2 [--threads 2] [--rounds 2] [--json OUT]

The workload is fixed: 8 prompts x 8 samples = 64 completions per step, exactly 32 new tokens each
(``min_new_tokens = max_new_tokens = 32`` in the model's generation config, so no completion stops at EOS),
the 2-layer random-init toy Llama of ``rlkit.toy`` (``--size tiny``: hidden 64), the toy echo reward
(``rewards/toy.py:echo``), temperature 1.0, no KL (no reference model), one PPO epoch and one mini-batch,
i.e. exactly one optimizer step per RL step, fp32 on CPU.  Every step uses the same 8 prompts.

Both trainers run in this one process with the same ``torch.set_num_threads``, in ABBA order over
``--rounds`` (rlkit, TRL, TRL, rlkit, ...) so that load from other processes on a shared machine hits both
alike.  Each round builds a fresh trainer from the same weights and runs ``--warmup`` untimed steps and
``--steps`` timed ones; the table reports the median over all timed steps of all rounds.

Per-step time is wall clock, step end to step end: for rlkit the ``Trainer.step()`` call, for TRL the
interval between consecutive ``on_step_end`` callbacks (data loading, generation, reward, loss,
backward, optimizer, TRL's own metric bookkeeping).  Stage times: rlkit's ``time/*`` metrics; for TRL the
time inside its methods ``_generate`` (rollout), ``_calculate_rewards`` (reward),
``_generate_and_score_completions`` minus those two (advantage: padding, advantages, metric gathers),
``training_step`` minus ``_prepare_inputs`` plus ``_clip_grad_norm`` plus ``optimizer.step`` (train).
``other`` is the step minus the named stages.  Stage medians need not add up to the step median.
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
STAGES = ["rollout", "reward", "score", "advantage", "train", "weight_sync", "other"]
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


def summarize_lengths(lengths: List[int]) -> Dict[str, float]:
    return {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)} if lengths else {}


# --------------------------------------------------------------------- rlkit
def run_rlkit(model_dir: str, rows, args, workdir: str) -> Dict[str, Any]:
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    n = args.warmup + args.steps
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
        "trainer.total_steps": n,
        "trainer.lr": args.lr,
        "trainer.max_grad_norm": 1.0,
        "trainer.lr_schedule": "constant",
        "trainer.output_dir": workdir,
        "trainer.run_name": "bench",
        "trainer.progress_bar": False,
        "trainer.tensorboard": False,
        "trainer.log_completions": False,
        "trainer.save_final": False,
    }
    cfg = load_config([f"{k}={v}" for k, v in overrides.items()])
    tr = Trainer(cfg, train_rows=[dict(r) for r in rows])
    opt_steps = [0]
    inner = getattr(tr.optimizer, "optimizer", tr.optimizer)  # accelerate wraps the torch optimizer
    inner.register_step_post_hook(lambda *_: opt_steps.__setitem__(0, opt_steps[0] + 1))

    steps = []
    for i in range(n):
        torch.set_num_threads(args.threads)
        before = opt_steps[0]
        t0 = time.perf_counter()
        m = tr.step()
        wall = time.perf_counter() - t0
        st = {k: float(m.get(f"time/{k}", 0.0)) for k in STAGES if k != "other"}
        st["other"] = wall - sum(st.values())
        steps.append({
            "step": wall, **st, "warmup": i < args.warmup,
            "completions": float(m.get("train/samples", float("nan"))),
            "optimizer_steps": opt_steps[0] - before,
            "length_min": m.get("response_length/min"), "length_max": m.get("response_length/max"),
            "length_mean": m.get("response_length/mean"), "truncation_rate": m.get("truncation_rate"),
            "logprob_gap": m.get("logprob_gap/mean"), "reward": m.get("reward/mean"),
        })
    dtypes = sorted({str(p.dtype) for p in tr.unwrapped_lm.parameters()})
    info = {"score_pass": bool(tr.score_pass), "param_dtypes": dtypes, "threads_after": torch.get_num_threads(),
            "mixed_precision": str(tr.acc.mixed_precision)}
    del tr
    return {"steps": steps, "info": info}


# ----------------------------------------------------------------------- TRL
def trl_available() -> bool:
    try:
        import trl  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 (a broken install counts as absent)
        return False


def run_trl(model_dir: str, rows, args, workdir: str) -> Dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.toy import echo

    n = args.warmup + args.steps
    # the same 8 prompts, in the same order, once per step (sequential sampler: step k = rows 8k..8k+7)
    ds = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for _ in range(n) for r in rows])
    batches: List[Dict[str, Any]] = []

    def echo_reward(completions, answer, completion_ids=None, **kwargs):
        batches.append({"n": len(completions), "lengths": [len(c) for c in completion_ids]})
        return echo(completions, answer)

    echo_reward.__name__ = "echo"

    cfg = GRPOConfig(
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
    trainer = GRPOTrainer(model=model, reward_funcs=echo_reward, args=cfg, train_dataset=ds, processing_class=tok)

    acc: Dict[str, float] = defaultdict(float)
    calls: Dict[str, int] = defaultdict(int)

    def wrap(name: str) -> None:
        orig = getattr(trainer, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                acc[name] += time.perf_counter() - t
                calls[name] += 1

        setattr(trainer, name, timed)

    for name in ("training_step", "_prepare_inputs", "_generate_and_score_completions", "_generate",
                 "_calculate_rewards", "_clip_grad_norm", "_get_per_token_logps_and_entropies"):
        wrap(name)

    steps: List[Dict[str, Any]] = []

    class StepTimer(TrainerCallback):
        last_end = None
        t_opt = 0.0

        def on_train_begin(self, *a, **kw):
            self.last_end = time.perf_counter()

        def on_step_begin(self, *a, **kw):
            torch.set_num_threads(args.threads)

        def on_pre_optimizer_step(self, *a, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, *a, **kw):
            acc["optimizer.step"] += time.perf_counter() - self.t_opt
            calls["optimizer.step"] += 1

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            wall, self.last_end = now - self.last_end, now
            a_ = dict(acc)
            c_ = dict(calls)
            acc.clear()
            calls.clear()
            g = lambda k: a_.get(k, 0.0)  # noqa: E731
            st = {"rollout": g("_generate"), "reward": g("_calculate_rewards"), "score": 0.0,
                  "advantage": g("_generate_and_score_completions") - g("_generate") - g("_calculate_rewards"),
                  "train": g("training_step") - g("_prepare_inputs") + g("_clip_grad_norm") + g("optimizer.step"),
                  "weight_sync": 0.0}
            st["other"] = wall - sum(st.values())
            b = batches[-1] if batches else {"n": 0, "lengths": []}
            lens = summarize_lengths(b["lengths"])
            steps.append({
                "step": wall, **st, "warmup": len(steps) < args.warmup, "completions": float(b["n"]),
                "optimizer_steps": c_.get("optimizer.step", 0),
                "logprob_forwards": c_.get("_get_per_token_logps_and_entropies", 0),
                "length_min": lens.get("min"), "length_max": lens.get("max"), "length_mean": lens.get("mean"),
            })

    trainer.add_callback(StepTimer())
    torch.set_num_threads(args.threads)
    trainer.train()
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
    info = {"param_dtypes": dtypes, "threads_after": torch.get_num_threads(),
            "mixed_precision": str(trainer.accelerator.mixed_precision), "loss_type": cfg.loss_type,
            "steps_per_generation": cfg.steps_per_generation, "generation_batch_size": cfg.generation_batch_size,
            "gradient_checkpointing": cfg.gradient_checkpointing, "device": str(trainer.accelerator.device),
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__}
    del trainer, model
    return {"steps": steps, "info": info}


# ------------------------------------------------------------------- report
def medians(steps: List[Dict[str, Any]]) -> Dict[str, float]:
    timed = [s for s in steps if not s["warmup"]]
    return {k: statistics.median(s[k] for s in timed) for k in STAGES + ["step"]} if timed else {}


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


def table(ours: Dict[str, float], trl: Dict[str, float] | None) -> str:
    head = f"{'stage':<12} {'rlkit s/step':>13}"
    if trl:
        head += f" {'TRL s/step':>11} {'rlkit/TRL':>10}"
    lines = [head, "-" * len(head)]
    for k in STAGES + ["step"]:
        row = f"{k:<12} {ours[k]:>13.4f}"
        if trl:
            ratio = ours[k] / trl[k] if trl[k] > 1e-4 else float("nan")
            row += f" {trl[k]:>11.4f} {ratio:>10.2f}" if ratio == ratio else f" {trl[k]:>11.4f} {'-':>10}"
        if k == "step":
            lines.append("-" * len(head))
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (rlkit,TRL,TRL,rlkit,...)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both trainers")
    p.add_argument("--size", default="tiny", help="rlkit.toy size (tiny: 2 layers, hidden 64)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="grpo",
                   help="TRL loss_type; rlkit runs the matching aggregation (grpo: seq_mean_token_mean, dapo: token_mean)")
    p.add_argument("--no-trl", action="store_true", help="time rlkit only")
    p.add_argument("--json", metavar="OUT", help="write settings, versions, per-step times and medians here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1 (TRL's first interval includes its start-up)")

    import logging
    import warnings

    logging.getLogger("rlkit").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with_trl = not args.no_trl and trl_available()
    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"threads: torch.set_num_threads({args.threads}) (os.cpu_count()={os.cpu_count()}); interop threads "
          f"{torch.get_num_interop_threads()}")
    print(f"workload: {PROMPTS} prompts x {SAMPLES} samples = {PROMPTS * SAMPLES} completions/step, {NEW_TOKENS} new tokens, "
          f"toy:{args.size} fp32, lr {args.lr}, loss {args.loss_type} <-> rlkit {LOSS_TYPES[args.loss_type]}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s)")
    if not with_trl:
        print("TRL: " + ("skipped (--no-trl)" if args.no_trl else "not importable; `pip install trl==1.16.0` to compare"))

    runs: Dict[str, List[Dict[str, Any]]] = {"rlkit": [], "trl": []}
    infos: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rlkit_bench_") as tmp:
        os.environ["RLKIT_CACHE"] = os.path.join(tmp, "cache")
        model_dir = make_model_dir(tmp, args.size)
        rows = prompt_rows()
        order: List[str] = []
        for r in range(args.rounds):
            pair = ["rlkit", "trl"] if r % 2 == 0 else ["trl", "rlkit"]
            order += [x for x in pair if x == "rlkit" or with_trl]
        for k, who in enumerate(order):
            t0 = time.perf_counter()
            fn = run_rlkit if who == "rlkit" else run_trl
            res = fn(model_dir, rows, args, os.path.join(tmp, f"run{k}"))
            runs[who] += res["steps"]
            infos[who] = res["info"]
            med = medians(res["steps"])
            print(f"  [{k + 1}/{len(order)}] {who:<5} median step {med['step']:.4f}s  ({time.perf_counter() - t0:.1f}s incl. setup)",
                  flush=True)

    problems = check("rlkit", runs["rlkit"]) + (check("trl", runs["trl"]) if with_trl else [])
    ours = medians(runs["rlkit"])
    theirs = medians(runs["trl"]) if with_trl else None
    n_timed = sum(not s["warmup"] for s in runs["rlkit"])
    print()
    print(f"median seconds per step over {n_timed} timed steps per trainer")
    print(table(ours, theirs))
    ratio = ours["step"] / theirs["step"] if theirs else None
    if theirs:
        print(f"\nrlkit / TRL step time: {ratio:.2f}x  ({'rlkit faster' if ratio < 1 else 'rlkit slower'})")
    for who, info in infos.items():
        print(f"{who}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    lens = [s["length_mean"] for v in runs.values() for s in v if not s["warmup"]]
    if lens:
        print(f"completion length: mean over timed steps {sum(lens) / len(lens):.2f} tokens (want {NEW_TOKENS})")
    if problems:
        print("\nFAIRNESS CHECK FAILED:\n  " + "\n  ".join(problems[:20]))
    else:
        print(f"fairness: every timed step of both trainers had {PROMPTS * SAMPLES} completions of exactly {NEW_TOKENS} tokens "
              f"and one optimizer step")

    if args.json:
        out = {"versions": vers, "threads": args.threads, "cpu_count": os.cpu_count(),
               "workload": {"prompts": PROMPTS, "samples_per_prompt": SAMPLES, "new_tokens": NEW_TOKENS, "model": f"toy:{args.size}",
                            "lr": args.lr, "trl_loss_type": args.loss_type, "rlkit_aggregation": LOSS_TYPES[args.loss_type],
                            "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds},
               "median_s": {"rlkit": ours, **({"trl": theirs} if theirs else {})}, "ratio_rlkit_over_trl": ratio,
               "info": infos, "per_step": runs, "fairness_problems": problems}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
