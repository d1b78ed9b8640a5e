"""Step metrics to ``metrics.jsonl``, the console, TensorBoard and (optionally) wandb;
completions to ``completions.jsonl``.  Only the main process writes."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional


def _clean(v: Any):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drop lines whose ``step`` is past ``max_step`` (lines a killed run wrote after its last checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= max_step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class Tracker:
    CONSOLE_KEYS = ("reward/mean", "accuracy", "kl/mean", "entropy/mean", "response_length/mean", "loss/policy", "time/step")

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, wandb_cfg: Optional[Dict[str, Any]] = None,
                 config_dict: Optional[Dict[str, Any]] = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.completions_path = os.path.join(run_dir, "completions.jsonl")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception:  # tensorboard missing: metrics.jsonl is the record
                self.tb = None
        if wandb_cfg:
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.get("project", "rlkit"), name=os.path.basename(run_dir),
                                    dir=run_dir, config=config_dict, resume="allow")

    def log(self, step: int, metrics: Dict[str, float], console=None) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        if console is not None:
            parts = [f"{k}={metrics[k]:.4g}" for k in self.CONSOLE_KEYS if isinstance(metrics.get(k), (int, float))]
            console(f"step {step}: " + " ".join(parts))

    def log_completions(self, step: int, rows: List[Dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.completions_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}, default=str) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
