"""Per-step cost of running user reward functions in worker processes (not a test).

    python benchmarks/reward_isolation.py                      # 64 completions of ~1000 characters, 200 calls
    python benchmarks/reward_isolation.py --samples 256 --calls 100 --trainer-steps 0

Part 1 times one ``Rewarder`` call (= the reward stage of one step) for the same cheap user
reward (a ``file.py:fn`` that extracts the last number of each completion and compares it with
the gold answer) under ``reward.isolation`` = ``none`` (called in line), ``thread`` (a thread per
call, abandoned on timeout) and ``process`` (a pebble worker pool, killed on timeout), interleaved
call by call, and prints the median per call and the ratio to ``none``.  The process pool's
start-up (paid once, at the first call) is printed separately.

Part 2 (``--trainer-steps N``) runs the toy:tiny GRPO trainer for N steps with ``thread`` and with
``process`` isolation (the toy echo reward from ``rewards/toy.py``) and prints the median
``time/reward`` and ``time/step``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REWARD = '''
import re

_NUM = re.compile(r"-?\\d[\\d,]*\\.?\\d*")


def last_number(completions, answer, **kwargs):
    out = []
    for text, gold in zip(completions, answer):
        nums = _NUM.findall(text)
        out.append(float(bool(nums) and nums[-1].replace(",", "").rstrip(".") == str(gold)))
    return out
'''


def batch(samples: int, chars: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "so", "we", "add", "then", "total", "is", "apples", "and", "=", "+"]
    completions, answers, ids = [], [], []
    for _ in range(samples):
        text = []
        while sum(len(w) + 1 for w in text) < chars:
            text.append(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999)))
        gold = rng.randint(0, 999)
        completions.append(" ".join(text) + f" #### {gold if rng.random() < 0.5 else gold + 1}")
        answers.append(str(gold))
        ids.append([rng.randint(3, 30000) for _ in range(chars // 4)])
    return completions, answers, ids


def bench_rewarder(args):
    from rlkit import reward_pool
    from rlkit.config import RewardConfig
    from rlkit.rewarding import Rewarder

    d = tempfile.mkdtemp()
    path = os.path.join(d, "bench_reward.py")
    with open(path, "w") as f:
        f.write(REWARD)
    completions, answers, ids = batch(args.samples, args.chars)
    modes = ["none", "thread", "process"]
    rewarders = {m: Rewarder(RewardConfig(functions=[f"{path}:last_number"], timeout_s=30.0, isolation=m))
                 for m in modes}

    def call(m):
        t = time.perf_counter()
        res = rewarders[m](prompts=["p"] * len(completions), completions=completions, completion_ids=ids,
                           columns={"answer": answers})
        return time.perf_counter() - t, res.rewards

    startup, ref = call("process")
    for m in modes:
        for _ in range(args.warmup):
            call(m)
    times = {m: [] for m in modes}
    for _ in range(args.calls):
        for m in modes:
            dt, r = call(m)
            times[m].append(dt)
            assert r.tolist() == ref.tolist()
    base = statistics.median(times["none"])
    print(f"\nreward stage, one call: {args.samples} completions of ~{args.chars} characters "
          f"(+ completion_ids of {args.chars // 4} tokens), median of {args.calls} interleaved calls")
    print(f"{'isolation':<10} {'ms / call':>10} {'x none':>8} {'ms / call (min)':>16}")
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<10} {med * 1e3:>10.2f} {med / base:>8.2f} {min(times[m]) * 1e3:>16.2f}")
    print(f"process pool start-up (first call, once per run): {startup:.2f} s "
          f"({reward_pool.POOL_SIZE} spawned workers)")
    reward_pool.shutdown()


def bench_trainer(args):
    import logging

    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer

    logging.disable(logging.WARNING)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp()
    rows = echo_rows(256, seed=0)
    print(f"\ntoy:tiny GRPO, 4 prompts x 4 samples, {args.trainer_steps} steps per mode (after 1 warm-up step)")
    print(f"{'isolation':<10} {'time/reward ms':>15} {'time/step ms':>13}")
    res = {}
    for m in ("thread", "process"):
        cfg = load_config([
            "model.name_or_path=toy:tiny", "data.prompt_field=question", "data.answer_field=answer",
            "data.max_prompt_tokens=32", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
            f"reward.functions=[{repo}/rewards/toy.py:echo]", f"reward.isolation={m}",
            "trainer.prompts_per_step=4", f"trainer.total_steps={args.trainer_steps + 1}",
            f"trainer.output_dir={out}", f"trainer.run_name={m}", "trainer.progress_bar=false",
            "trainer.log_with=[]", "trainer.save_final=false"])
        tr = Trainer(cfg, train_rows=rows)
        rew, step = [], []
        for i in range(args.trainer_steps + 1):
            met = tr.step()
            if i:
                rew.append(met["time/reward"])
                step.append(met["time/step"])
        res[m] = (statistics.median(rew), statistics.median(step))
        print(f"{m:<10} {res[m][0] * 1e3:>15.2f} {res[m][1] * 1e3:>13.1f}")
    print(f"process / thread: reward stage {res['process'][0] / res['thread'][0]:.2f}x, "
          f"step {res['process'][1] / res['thread'][1]:.3f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--chars", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trainer-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import pebble

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, pebble {pebble.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    bench_rewarder(args)
    if args.trainer_steps:
        bench_trainer(args)


if __name__ == "__main__":
    main()
