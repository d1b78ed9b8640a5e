"""PCL's curriculum on prompts of clearly different difficulty (``recipes/grpo_pcl.yaml profile=tiers``).

    OMP_NUM_THREADS=1 python benchmarks/pcl_curriculum.py            # PCL
    OMP_NUM_THREADS=1 python benchmarks/pcl_curriculum.py --random   # selection ignoring the value model
    OMP_NUM_THREADS=1 python benchmarks/pcl_curriculum.py algorithm.prompt_selector.head_lr=1e-3   # any override

Prints the share of medium (p = 0.5) prompts among those chosen in steps 9-16 (uniform: 0.25), the mean
``pcl/empirical_dist_to_tau`` over those steps, and the value model's explained variance over every prompt
against its true success rate (rewards/tiers.py).  docs/methods/pcl.md quotes one run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", action="store_true", help="choose the first m prompts of the uniform pool")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    import torch

    import rlkit.algorithms.pcl as pcl
    from rewards.tiers import SUCCESS
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    if args.random:
        pcl.select_closest = lambda v, m, tau=0.5, decimals=6: list(range(m))
    cfg = load_config([f"recipe={REPO}/recipes/grpo_pcl.yaml", "profile=tiers", f"data.path={REPO}/recipes/data/tiers_train.jsonl",
                       f"reward.functions=[{REPO}/rewards/tiers.py:tier_reward]", f"trainer.output_dir={tempfile.mkdtemp()}", *args.overrides])
    tr = Trainer(cfg)
    chosen, select = [], tr.selector.select
    tr.selector.select = lambda step, n: chosen.append(select(step, n)) or chosen[-1]
    ms = [tr.step() for _ in range(cfg.trainer.total_steps)]
    tiers = [r["tier"] for r in tr.train_rows]
    half = len(ms) // 2
    late = [i for ids in chosen[half:] for i in ids]
    pred = tr.selector.predict(list(range(len(tiers))))
    p = torch.tensor([SUCCESS[t] for t in tiers])
    print(f"medium share of chosen prompts, steps {half + 1}-{len(ms)}: {sum(tiers[i] == 'mid' for i in late) / len(late):.3f}")
    print(f"mean pcl/empirical_dist_to_tau, steps {half + 1}-{len(ms)}: {sum(m['pcl/empirical_dist_to_tau'] for m in ms[half:]) / (len(ms) - half):.3f}")
    print(f"explained variance over all prompts: {pcl.explained_variance(pred, p):.3f}")
    print("mean prediction by tier:", {t: round(float(pred[[i for i, x in enumerate(tiers) if x == t]].mean()), 3) for t in SUCCESS})


if __name__ == "__main__":
    main()
