#!/usr/bin/env python
"""Asynchronous RL on 2 CPU cores: GRPO learning runs at ``rollout.max_staleness`` k = 0 and k = 1, side by side.

    OMP_NUM_THREADS=1 python benchmarks/async_speedup.py --seeds 4 --steps 30 --threshold 0.5
    OMP_NUM_THREADS=1 python benchmarks/async_speedup.py --quick          # 2-step smoke run of both modes

Workload (issue 11): the pretrained stories260K (``../shared/models/stories260K-hf``, or the directory in
``RLKIT_STORIES260K``; without it the script prints a "skipped" line and exits 0), 16 story openings x 4 samples = 64 completions x 48 new tokens per step (the base model
does not emit EOS within 48 tokens), temperature 1, lr 3e-4 (constant), one optimizer step per RL step, no KL, fp32,
the HF engine (``decode: lean``), default ``algorithm.tis_cap`` handling of rlkit at k >= 1.

Reward (``word_reward`` below, ``--word red``): 1.0 if the completion contains the word "red" (any case, punctuation
stripped), else 0.0.  The base model rarely earns it: 6% of 64 sampled completions of story openings contain "red"
(3% of the first step's batch here), while "bird" 25%, "happy" 17% are common and "cat", "moon" never appear (no
signal for GRPO).  "red" fits almost any story ("a red ball"), so GRPO learns it within tens of steps: at k = 0 the
3-step mean reward passes 0.5 after 12-15 steps and reaches ~1.0 by step 20 (lr 3e-3 learns it in 4 steps: too fast to
see a difference; lr 3e-4 is the default).  Steps to threshold: the first step whose mean reward over the last
``--window`` (3) steps reaches ``--threshold``.  The reward at step s is that of the batch trained at step s, which
at k = 1 was generated one weight version earlier than at k = 0: "versions to threshold" subtracts that staleness
(policy updates before the generating version), "s to thr" is the wall time from the end of step 1 (which holds the
rollout worker's start-up at k = 1) to the end of the threshold step.

Cores: 2 in total.  k = 0: one process with ``torch.set_num_threads(--k0-threads)`` (default 1; "1,2" runs both and the
ratio uses the faster: on this tiny model a second intra-op thread gains nothing and, on a busy machine, one spinning
OpenMP thread made a k = 0 step ~10x slower).  k = 1: the trainer process 1 thread and its one rollout worker process 1
thread (``rollout.num_workers=1``; rlkit/rollout/workers.py's ``thread_split`` gives 1 + 1 on 2 cores, and
``rollout.worker_threads=1`` is set when the config has that key), so the worker generates batch s+1 on one core while
step s trains on the other.  ``reward.isolation: none`` in both modes (``--reward-isolation``): the reward is a pure
function of this file.

Every (seed, k) run is a fresh subprocess (start-up, model load and worker spawn are not in the step times), and the
order alternates k0, k1 / k1, k0 from seed to seed, so drifting load from other jobs on a shared machine hits both
modes.  Seconds per step: the median wall time of ``Trainer.step`` over the steps after ``--warmup`` (2); the
throughput ratio is median(k=0) / median(k=1) over all seeds of this one invocation, with the per-seed ratios of
back-to-back runs.  Because wall time on a shared machine moves with other jobs' load, the script also measures CPU
seconds per step of the trainer process and of its rollout worker process (psutil): on idle cores a k = 0 step takes
the trainer's CPU time and a k = 1 step the larger of the two (the pipeline's critical path), so their ratio is the
throughput an idle 2-core machine would show.  Where the time goes: medians of the trainer's ``time/*`` metrics
(rollout, reward, train, wait_for_rollout, weight_transfer, ...) per mode; at k = 1 rollout and reward are the worker's.

Options: ``--seeds N`` (seeds 0..N-1), ``--steps``, ``--threshold``, ``--window``, ``--warmup``, ``--word``, ``--lr``,
``--k0-threads``, ``--modes``, ``--json OUT``, ``--quick`` (2 steps of k = 0 and k = 1, seed 0: a smoke test that both
modes run; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("RLKIT_STORIES260K", REPO.parent / "shared" / "models" / "stories260K-hf"))
PROMPTS = [
    "Once upon a time, there was a little girl named Lily.", "One day, a boy named Tom went to the park.",
    "The sun was shining and the birds were singing.", "There was a big dog who liked to play.",
    "Sara had a red ball.", "Ben and his mom went to the store.", "A little cat sat on the mat.",
    "The bird flew over the tree.", "Tim had a new toy car.", "Mia liked to draw pictures.",
    "The little boat sailed on the lake.", "Max and Sue played in the garden.", "It was a cold and rainy day.",
    "Anna found a shiny box under her bed.", "The old man had a kind dog.", "Lucy wanted to bake a cake.",
]
SAMPLES, NEW_TOKENS = 4, 48
TARGET_WORD = os.environ.get("RLKIT_BENCH_WORD", "red")
_ENV: Dict[str, str] = {}


def word_reward(completions, **kwargs):
    """1.0 if the completion contains the target word (``RLKIT_BENCH_WORD``, default "red"), else 0.0."""
    out = []
    for c in completions:
        words = [w.strip('.,!?"\'():;').lower() for w in c.split()]
        out.append(1.0 if TARGET_WORD in words else 0.0)
    return out


def worker_thread_overrides(k: int) -> Dict[str, Any]:
    """The thread split at k >= 1: trainer 1 thread (set in ``one_run``), the rollout worker 1 thread.
    Uses ``rollout.worker_threads`` when the config has it (engineer B's key), else relies on OMP_NUM_THREADS=1
    being inherited by the spawned worker."""
    if k == 0:
        return {}
    from rlkit.config import RolloutConfig

    if "worker_threads" in getattr(RolloutConfig, "__dataclass_fields__", {}):
        return {"rollout.worker_threads": 1}
    return {}


def overrides(k: int, seed: int, steps: int, out_dir: str, word: str, new_tokens: int, lr: float,
              isolation: str = "none") -> List[str]:
    ov: Dict[str, Any] = {
        "model.name_or_path": str(MODEL.resolve()), "model.dtype": "float32",
        "data.prompt_field": "question", "data.answer_field": "answer", "data.max_prompt_tokens": 32,
        "rollout.samples_per_prompt": SAMPLES, "rollout.max_new_tokens": new_tokens, "rollout.temperature": 1.0,
        "reward.functions": f"[{Path(__file__).resolve()}:word_reward]",
        "reward.isolation": isolation, "algorithm.kl.coef": 0.0,
        "trainer.prompts_per_step": len(PROMPTS), "trainer.ppo_epochs": 1, "trainer.total_steps": steps,
        "trainer.lr": lr, "trainer.lr_schedule": "constant", "trainer.seed": seed,
        "trainer.output_dir": out_dir, "trainer.run_name": f"k{k}_s{seed}", "trainer.progress_bar": False,
        "trainer.log_with": "[]", "trainer.save_final": False, "trainer.log_completions": False,
    }
    if k > 0:
        ov.update({"rollout.max_staleness": k, "rollout.num_workers": 1, **worker_thread_overrides(k)})
    return [f"{a}={b}" for a, b in ov.items()]


# ----------------------------------------------------------------------------------------------------- one run
def one_run(args) -> Dict[str, Any]:
    """Runs in its own subprocess: one Trainer.train() with per-step wall times; returns its record."""
    import logging
    import warnings

    os.environ["RLKIT_BENCH_WORD"] = args.word            # the reward workers inherit it
    import torch

    threads = args.threads
    torch.set_num_threads(threads)
    logging.getLogger("rlkit").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from step_time import children_cpu  # this script's directory is on sys.path

    rows = [{"question": p, "answer": args.word} for p in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="rlkit_async_") as tmp:
        cfg = load_config(overrides(args.k, args.seed, args.steps, tmp, args.word, args.new_tokens, args.lr,
                                  args.reward_isolation))
        t0 = time.perf_counter()
        tr = Trainer(cfg, train_rows=rows)
        setup_s = time.perf_counter() - t0
        walls: List[float] = []
        cpu_self: List[float] = []
        cpu_children: List[float] = []
        mets: List[Dict[str, float]] = []
        orig = tr.step

        def timed_step():
            torch.set_num_threads(threads)
            c0, w0 = time.process_time(), children_cpu()
            t = time.perf_counter()
            m = orig()
            walls.append(time.perf_counter() - t)
            cpu_self.append(time.process_time() - c0)
            cpu_children.append(children_cpu() - w0)
            mets.append({k: float(v) for k, v in m.items() if isinstance(v, (int, float))})
            return m

        tr.step = timed_step                                # Trainer.train calls self.step()
        t1 = time.perf_counter()
        tr.train()
        total_s = time.perf_counter() - t1
        close = getattr(tr, "close", None)
        if callable(close):
            close()
    return {"k": args.k, "seed": args.seed, "threads": threads, "setup_s": setup_s, "train_s": total_s,
            "step_wall": walls, "cpu_trainer": cpu_self, "cpu_workers": cpu_children, "metrics": mets, "overrides": overrides(args.k, args.seed, args.steps, "OUT", args.word,
                                                                          args.new_tokens, args.lr, args.reward_isolation)}


def launch(k: int, seed: int, threads: int, args, out: Path) -> Dict[str, Any]:
    res = out / f"k{k}_t{threads}_s{seed}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-run", "--k", str(k), "--seed", str(seed),
           "--threads", str(threads), "--steps", str(args.steps), "--word", args.word, "--new-tokens", str(args.new_tokens),
           "--lr", str(args.lr), "--reward-isolation", args.reward_isolation, "--result", str(res)] + (["--silent"] if args.silent else [])
    env = dict(_ENV, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               RLKIT_BENCH_WORD=args.word)
    t = time.perf_counter()
    tail: List[str] = []
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:                                     # progress lines through; keep the tail for errors
            if not args.silent:
                print(line, end="", file=sys.stderr, flush=True)
            if line.strip():
                tail = (tail + [line.rstrip()])[-5:]
    if p.returncode != 0:
        return {"k": k, "seed": seed, "threads": threads, "error": f"exit {p.returncode}: {tail[-1][:300] if tail else '?'}",
                "wall_s": time.perf_counter() - t}
    r = json.loads(res.read_text())
    r["wall_s"] = time.perf_counter() - t
    return r


# ------------------------------------------------------------------------------------------------------ report
def steps_to(rewards: List[float], threshold: float, window: int) -> Optional[int]:
    """First 1-based step whose mean reward over the last ``window`` steps (fewer at the start) is >= threshold."""
    for i in range(len(rewards)):
        w = rewards[max(0, i - window + 1): i + 1]
        if len(w) == window and sum(w) / len(w) >= threshold:
            return i + 1
    return None


def summarize_run(r: Dict[str, Any], args) -> Dict[str, Any]:
    if "error" in r:
        return r
    walls = r["step_wall"][args.warmup:] or r["step_wall"]
    times: Dict[str, float] = {}
    keys = sorted({k for m in r["metrics"] for k in m if k.startswith("time/")})
    for key in keys:
        vals = [m[key] for m in r["metrics"][args.warmup:] or r["metrics"] if key in m]
        if vals:
            times[key[5:]] = statistics.median(vals)
    rewards = [m.get("reward/mean", float("nan")) for m in r["metrics"]]
    s2t = steps_to(rewards, args.threshold, args.window) if args.threshold is not None else None
    # the batch trained at step s was generated by weight version s - 1 - staleness: "versions" counts policy updates
    stale = [m.get("async/staleness", 0.0) for m in r["metrics"]]
    v2t = (s2t - round(stale[s2t - 1])) if s2t else None
    cw = r.get("cpu_workers") or []
    ct = r.get("cpu_trainer") or []
    cpu_t = statistics.median(ct[args.warmup:] or ct) if ct else None
    cpu_w = statistics.median(cw[args.warmup:] or cw) if cw else None
    asyncm = {k: statistics.median([m[k] for m in r["metrics"][args.warmup:] or r["metrics"] if k in m])
              for k in sorted({k for m in r["metrics"] for k in m if k.startswith("async/")})
              if any(k in m for m in r["metrics"][args.warmup:] or r["metrics"])}
    return {"k": r["k"], "seed": r["seed"], "threads": r["threads"], "s_per_step": statistics.median(walls),
            "s_per_step_min": min(walls), "times": times, "rewards": rewards, "steps_to_threshold": s2t,
            "versions_to_threshold": v2t, "cpu_trainer": cpu_t, "cpu_workers": cpu_w,
            # wall seconds from the end of step 1 (which holds the worker's start-up at k >= 1) to the threshold step
            "time_to_threshold_s": sum(r["step_wall"][1:s2t]) if s2t else None, "async": asyncm,
            "step_wall": r["step_wall"], "first_step_s": r["step_wall"][0] if r["step_wall"] else None,
            "setup_s": r["setup_s"], "wall_s": r.get("wall_s")}


def fmt(x, d=3, none="-"):
    return none if x is None else f"{x:.{d}f}"


def _name(m: tuple) -> str:
    return f"k={m[0]} ({m[1]}+1 thr)" if m[0] else f"k=0 ({m[1]} thr)"


def _med(xs: List[Any]) -> Optional[float]:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def report(runs: List[Dict[str, Any]], args, modes: List[tuple], load: tuple) -> str:
    lines = []
    ok = [r for r in runs if "error" not in r]
    for r in runs:
        if "error" in r:
            lines.append(f"FAILED k={r['k']} threads={r['threads']} seed={r['seed']}: {r['error']}")
    by_mode: Dict[tuple, List[Dict[str, Any]]] = {m: [r for r in ok if (r["k"], r["threads"]) == m] for m in modes}
    never = ">" + str(args.steps)
    head = (f"{'mode':<16} {'seeds':>5} {'s/step med':>10}  {'(per seed)':<17} {'steps to thr':<14} "
            f"{'versions to thr':<16} {'s to thr':<14} {'final reward':>12}")
    lines += [head, "-" * len(head)]
    med: Dict[tuple, float] = {}
    for m, rs in by_mode.items():
        if not rs:
            continue
        sps = [r["s_per_step"] for r in rs]
        med[m] = statistics.median(sps)
        fin = [statistics.mean(r["rewards"][-args.window:]) for r in rs]
        lines.append(f"{_name(m):<16} {len(rs):>5} {med[m]:>10.3f}  {' '.join(fmt(x, 2) for x in sps):<17} "
                     f"{' '.join(str(r['steps_to_threshold'] or never) for r in rs):<14} "
                     f"{' '.join(str(r.get('versions_to_threshold') or never) for r in rs):<16} "
                     f"{' '.join(fmt(r['time_to_threshold_s'], 0, never) for r in rs):<14} {statistics.mean(fin):>12.3f}")
    k0 = [m for m in med if m[0] == 0]
    k1 = [m for m in med if m[0] > 0]
    base = min(k0, key=lambda m: med[m]) if k0 else None
    if base and k1:
        for m in k1:
            pairs = [b["s_per_step"] / a["s_per_step"] for a in by_mode[m] for b in by_mode[base] if a["seed"] == b["seed"]]
            lines.append(f"throughput k={m[0]} / k=0 ({base[1]} thr): {med[base] / med[m]:.2f}x (median s/step "
                         f"{med[base]:.3f} / {med[m]:.3f}; target >= 1.6x); per seed (back-to-back runs): "
                         + " ".join(f"{x:.2f}" for x in pairs))
    lines += ["", "CPU seconds per step (medians; trainer process, and its rollout worker process): the critical path on "
              "idle cores is the trainer at k=0 and max(trainer, worker) at k=1, so their ratio is the throughput an idle "
              "2-core machine would give, whatever the load was during the run:"]
    crit: Dict[tuple, float] = {}
    for m, rs in by_mode.items():
        if not rs:
            continue
        ct, cw = _med([r.get("cpu_trainer") for r in rs]), _med([r.get("cpu_workers") for r in rs])
        if ct is None:
            continue
        crit[m] = max(ct, cw or 0.0) if m[0] else ct
        lines.append(f"  {_name(m):<16} trainer {ct:.3f}  worker {fmt(cw)}  critical path {crit[m]:.3f}")
    if base in crit:
        for m in k1:
            if m in crit:
                lines.append(f"  CPU-bound throughput estimate k={m[0]} / k=0: {crit[base] / crit[m]:.2f}x")
    lines += ["", "where the time goes (medians of the trainer's time/* metrics after warm-up, seconds; at k>=1 rollout and "
              "reward are the worker's, overlapped):"]
    keys = sorted({k for r in ok for k in r["times"]})
    lines.append(f"{'mode':<16} " + " ".join(f"{k[:16]:>16}" for k in keys))
    for m, rs in by_mode.items():
        if rs:
            lines.append(f"{_name(m):<16} " + " ".join(f"{fmt(_med([r['times'].get(k) for r in rs])):>16}" for k in keys))
    for m, rs in by_mode.items():
        a = [r["async"] for r in rs if r["async"]]
        if a:
            lines.append(f"k={m[0]} async/*: " + ", ".join(f"{k} {statistics.median([x[k] for x in a if k in x]):.3f}"
                                                          for k in sorted({k for x in a for k in x})))
    lines.append(f"load average (1 min) before/after: {load[0]} / {load[1]} on {os.cpu_count()} cores (a shared machine)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threshold", type=float, default=0.5, help="mean reward over --window steps")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the seconds-per-step median")
    p.add_argument("--word", default="red", help="the reward's target word")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--k0-threads", default="1", help="torch threads of the k=0 run(s), e.g. 1 or 1,2 (the ratio uses "
                                                     "the faster k=0)")
    p.add_argument("--reward-isolation", default="none", choices=["none", "thread", "process"],
                   help="reward.isolation for both modes (default none: the reward is a pure function in this file)")
    p.add_argument("--modes", default="0,1", help="staleness values to run (0,1)")
    p.add_argument("--quick", action="store_true", help="2 steps of each mode, seed 0 (smoke test)")
    p.add_argument("--silent", action="store_true", help="no per-step progress lines")
    p.add_argument("--json", metavar="OUT")
    # internal: one run in this process
    p.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_run:
        res = one_run(args)
        Path(args.result).write_text(json.dumps(res))
        return 0
    if not MODEL.exists():
        print(f"skipped: {MODEL} not found (needs ../shared/models/stories260K-hf, or RLKIT_STORIES260K=DIR)")
        return 0
    if args.quick:
        args.seeds, args.steps, args.warmup = 1, 2, 1
    ks = [int(x) for x in args.modes.split(",")]
    modes = [(0, int(t)) for t in args.k0_threads.split(",")] * (0 in ks) + [(k, 1) for k in ks if k > 0]
    import torch

    global _ENV
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _rlkit_env import rlkit_env

    _ENV = rlkit_env()
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load0[0]:.2f}; {len(PROMPTS)} prompts x {SAMPLES} "
          f"samples x {args.new_tokens} new tokens, reward: contains {args.word!r}; {args.seeds} seed(s) x {args.steps} "
          f"steps; modes {modes}; threshold {args.threshold} over {args.window} steps", flush=True)
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlkit_async_bench_") as tmp:
        for seed in range(args.seeds):
            order = modes if seed % 2 == 0 else modes[::-1]   # alternate so drifting load hits both modes
            for k, threads in order:
                r = launch(k, seed, threads, args, Path(tmp))
                runs.append(summarize_run(r, args))
                s = runs[-1]
                print(f"run k={k} threads={threads} seed={seed}: "
                      + (s["error"] if "error" in s else f"{s['s_per_step']:.3f} s/step, steps to threshold "
                         f"{s['steps_to_threshold']}, wall {s['wall_s']:.0f} s"), flush=True)
    load1 = os.getloadavg()
    text = report(runs, args, modes, (f"{load0[0]:.2f}", f"{load1[0]:.2f}"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "load": [load0, load1]}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
