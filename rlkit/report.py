"""Run reports from ``metrics.jsonl``: PNG plots and a terminal reward curve.

    python -m rlkit report runs/quickstart            # writes runs/quickstart/report/*.png
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

PANELS = [
    ("reward", ["reward/mean", "accuracy"]),
    ("entropy", ["entropy/mean"]),
    ("response length", ["response_length/mean"]),
    ("KL", ["kl/mean", "kl_reward/mean"]),
    ("clip fraction", ["clipfrac/mean"]),
    ("log-prob gap (rollout vs trainer)", ["logprob_gap/mean", "logprob_gap/max"]),
    ("time per stage (s)", ["time/rollout", "time/reward", "time/score", "time/train", "time/weight_sync"]),
]


def read_metrics(run_dir: str) -> List[Dict[str, float]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ascii_curve(values: Sequence[float], width: int = 60, height: int = 10, label: str = "reward") -> str:
    """A small text plot (steps on x, value on y) for terminals and CI logs."""
    vals = [v for v in values if v is not None]
    if not vals:
        return f"{label}: no data"
    n = len(values)
    cols = min(width, n)
    buckets = []
    for c in range(cols):
        seg = [v for v in values[c * n // cols:(c + 1) * n // cols] if v is not None]
        buckets.append(sum(seg) / len(seg) if seg else None)
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    grid = [[" "] * cols for _ in range(height)]
    for c, v in enumerate(buckets):
        if v is not None:
            r = int(round((v - lo) / span * (height - 1)))
            grid[height - 1 - r][c] = "*"
    lines = [f"{hi:8.3f} |" + "".join(grid[0])] + ["         |" + "".join(row) for row in grid[1:-1]]
    lines.append(f"{lo:8.3f} |" + "".join(grid[-1]))
    lines.append("         +" + "-" * cols)
    lines.append(f"          {label} over {n} steps (step 1 .. {n})")
    return "\n".join(lines)


def plot_runs(run_dirs: Sequence[str], out_dir: str) -> List[str]:
    """One PNG per panel, every run overlaid; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = {os.path.basename(os.path.normpath(d)): read_metrics(d) for d in run_dirs}
    paths = []
    for title, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for name, rows in runs.items():
            for k in keys:
                xs = [r["step"] for r in rows if r.get(k) is not None]
                ys = [r[k] for r in rows if r.get(k) is not None]
                if xs:
                    ax.plot(xs, ys, label=f"{name}: {k}" if len(runs) > 1 else k)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(out_dir, title.split(" (")[0].replace(" ", "_") + ".png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m rlkit report RUN_DIR [RUN_DIR ...]")
    out = os.path.join(argv[0], "report") if len(argv) == 1 else "report"
    for p in plot_runs(argv, out):
        print(f"wrote {p}")
    for d in argv:
        print(ascii_curve([r.get("reward/mean") for r in read_metrics(d)], label=f"{os.path.basename(os.path.normpath(d))} reward/mean"))
