"""Seconds per training step of every method's tiny profile vs plain GRPO on the same settings, side by side.

    OMP_NUM_THREADS=1 python benchmarks/method_overhead.py                 # every method, 1 warm-up + 4 timed steps
    OMP_NUM_THREADS=1 python benchmarks/method_overhead.py --only opsd opd --steps 6 --markdown

For each method, one process builds two trainers from the recipe's ``tiny`` profile: the method as the recipe
configures it, and the same config with the method removed -- plain GRPO: ``advantage: grpo``, ``policy_loss:
ppo_clip``, no filters, token weighting, controllers or regularizers, the ``uniform`` prompt selector, the
``single`` rollout strategy, and the echo task's plain reward (``rewards/toy.py:echo``).  Everything else (model
``toy:tiny`` for every row, batch sizes, new tokens, PPO epochs, mini-batches, KL, aggregation) is the recipe's.
The two trainers then step alternately (GRPO, method, GRPO, ...), so load from other processes on a shared
machine hits both alike; the table gives the median seconds of ``Trainer.step()`` over the timed steps and their
ratio.  A ratio is "what this method costs per step at tiny scale": rollout-heavy methods (SPO's Monte-Carlo /
tree rollouts, EFRame's exploration, UEC's probes) and extra forwards (OPSD/OPD's teacher, PCL's value model)
show up; at real model sizes the ratios change (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# method (docs/methods/<page>.md) -> recipe with a tiny profile
METHODS = [
    ("grpo (control)", "grpo_math", None),
    ("tempo", "grpo_tempo", "tempo"),
    ("d3s", "grpo_d3s", "d3s"),
    ("spo (chain)", "spo_chain_gsm8k", "spo"),
    ("spo (tree)", "spo_tree_math", "spo"),
    ("eframe", "eframe", "eframe"),
    ("uec", "uec", "uec"),
    ("pcl", "grpo_pcl", "pcl"),
    ("mmupt", "mmupt", "mmupt"),
    ("opsd", "opsd", "opsd"),
    ("opd", "opd", "opd"),
    ("dump", "dump_math", "dump"),
    ("length curriculum", "length_curriculum_gsm8k", "length_curriculum"),
    ("tempo+d3s+uec", "tempo_d3s_uec", None),
]

GRPO = ["algorithm.advantage=grpo", "algorithm.policy_loss=ppo_clip", "algorithm.filters=[]", "algorithm.token_weighting=[]",
        "algorithm.controllers=[]", "algorithm.regularizers=[]", "algorithm.prompt_selector=uniform", "rollout.strategy=single",
        "reward.functions=[rewards/toy.py:echo]", "reward.weights=null"]


def _trainer(recipe: str, extra, out: str):
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    args = [f"recipe={os.path.join(REPO, 'recipes', recipe + '.yaml')}", "profile=tiny", "model.name_or_path=toy:tiny",
            f"trainer.output_dir={out}", "trainer.save_every=0", "trainer.save_final=false", "eval.every_steps=0",
            "trainer.progress_bar=false", "trainer.log_with=[]", *extra]
    return Trainer(load_config(args))


def measure(recipe: str, warmup: int, steps: int):
    out = tempfile.mkdtemp(prefix="method_overhead_")
    cwd = os.getcwd()
    os.chdir(REPO)  # recipes name their data and reward files relative to the repository
    try:
        base = _trainer(recipe, GRPO + ["trainer.run_name=grpo"], out)
        meth = _trainer(recipe, ["trainer.run_name=method"], out)
    finally:
        os.chdir(cwd)
    tb, tm = [], []
    for i in range(warmup + steps):
        for tr, ts in ((base, tb), (meth, tm)):
            t = time.perf_counter()
            tr.step()
            if i >= warmup:
                ts.append(time.perf_counter() - t)
    return statistics.median(tb), statistics.median(tm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="method names (first word) to run")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args()
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    import platform

    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {a.warmup} warm-up + {a.steps} timed steps each")
    rows = []
    for name, recipe, page in METHODS:
        if a.only and name.split()[0] not in a.only:
            continue
        t0 = time.time()
        g, m = measure(recipe, a.warmup, a.steps)
        rows.append((name, recipe, g, m))
        print(f"  {name:<20} grpo {g:.3f} s  method {m:.3f} s  x{m / g:.2f}   ({time.time() - t0:.0f} s)", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}\n")
    if a.markdown:
        print("| method | recipe (profile tiny) | GRPO s/step | method s/step | ratio |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, recipe, g, m in rows:
            print(f"| {name} | `{recipe}` | {g:.3f} | {m:.3f} | {m / g:.2f}x |")
    else:
        print(f"{'method':<20} {'recipe':<26} {'GRPO s/step':>12} {'method s/step':>14} {'ratio':>7}")
        for name, recipe, g, m in rows:
            print(f"{name:<20} {recipe:<26} {g:>12.3f} {m:>14.3f} {m / g:>6.2f}x")


if __name__ == "__main__":
    main()
