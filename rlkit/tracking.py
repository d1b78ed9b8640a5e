"""Step metrics to ``metrics.jsonl`` and the console, and through accelerate's trackers (``trainer.log_with``:
TensorBoard, wandb, mlflow, ...; rlkit/trackers.py); completions to ``completions.jsonl`` (and a wandb table).
Only the main process writes."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional


def _clean(v: Any):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def use_progress_bar(enabled: bool) -> bool:
    """A tqdm bar only when asked for and stderr (where tqdm draws) is a terminal: in a file its frames pile up
    on one line, so there the caller prints one short line per step instead."""
    import sys

    try:
        return bool(enabled) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def quiet_library_bars() -> None:
    """Turn off the progress bars of transformers, huggingface_hub and datasets (weight loading, downloads, map):
    used when rlkit prints plain lines instead of a bar, so a log file gets no tqdm frames at all."""
    for mod, fn in (("transformers.utils.logging", "disable_progress_bar"),
                    ("huggingface_hub.utils", "disable_progress_bars"), ("datasets", "disable_progress_bars")):
        try:
            import importlib

            getattr(importlib.import_module(mod), fn)()
        except Exception:  # noqa: BLE001 - a library that is absent or changed: its bars stay
            pass


class Progress:
    """Progress over ``total`` items: a tqdm bar (``bar=True`` on a terminal) or one short line per update."""

    def __init__(self, total: int, desc: str, bar: bool, unit: str = "it", print_fn=print):
        import time

        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._print = print_fn
        self._t0 = time.perf_counter()
        self.bar = None
        if use_progress_bar(bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, k: int = 1) -> None:
        import time

        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        else:
            pct = 100.0 * self.done / max(self.total, 1)
            self._print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                        f"{time.perf_counter() - self._t0:.1f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def console_line(step: int, metrics: Dict[str, Any], keys, total: Optional[int] = None) -> str:
    """One short line for a step: ``step 3/20 reward/mean=0.25 accuracy=0.25 ... time/step=1.2``."""
    from .metric_names import trl_name

    parts = []
    for k in keys:  # a run logged with trainer.metric_names=trl has the TRL name only
        name = k if k in metrics else trl_name(k)
        if name is not None and isinstance(metrics.get(name), (int, float)):
            parts.append(f"{name}={metrics[name]:.4g}")
    return f"step {step}{f'/{total}' if total else ''}: " + " ".join(parts)


class Tracker:
    CONSOLE_KEYS = ("reward/mean", "accuracy", "kl/mean", "entropy/mean", "response_length/mean", "loss/policy", "time/step")

    def __init__(self, run_dir: str, enabled: bool, accelerator=None):
        """``accelerator``: its trackers (``trainer.log_with``, started by rlkit/trackers.py) get every step too."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.console = None        # set to a print function to get one short line per step
        self.total_steps: Optional[int] = None
        self.acc = accelerator
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.completions_path = os.path.join(run_dir, "completions.jsonl")

    def log(self, step: int, metrics: Dict[str, float], console=None) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        from .trackers import log

        log(self.acc, step, metrics)  # tensorboard, wandb, mlflow, ... (accelerate)
        console = console or self.console
        if console is not None:  # no progress bar (trainer.progress_bar=false, or output is not a terminal)
            console(console_line(step, metrics, self.CONSOLE_KEYS, self.total_steps))

    def log_completions(self, step: int, rows: List[Dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.completions_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in r.items()}}, default=str) + "\n")
        from .trackers import log_completions_table

        log_completions_table(self.acc, step, rows)  # a bounded wandb table when wandb is on

    def close(self) -> None:
        from .trackers import finish

        finish(self.acc)
