"""Atomic checkpoints: everything is written to ``step_N.tmp`` and renamed to
``step_N`` only when complete, so a crash never leaves a half checkpoint that
``resume=auto`` would pick.  Layout::

    step_N/model/         HF format (config, safetensors, tokenizer): from_pretrained / vLLM
    step_N/state/         accelerate state: optimizer, scheduler, RNG of every rank
    step_N/plugins_rankR.pt   each rank's plugin states (prompt-selector position, buffers, value models) and group-id counter
    step_N/rlkit.pt       the step (and rank 0's plugin states); written last
"""
from __future__ import annotations

import glob
import os
import re
import shutil
from typing import List, Optional

_STEP = re.compile(r"step_(\d+)$")


def list_checkpoints(ckpt_dir: str) -> List[str]:
    out = []
    for p in glob.glob(os.path.join(ckpt_dir, "step_*")):
        m = _STEP.search(p)
        if m and os.path.isdir(p) and os.path.exists(os.path.join(p, "rlkit.pt")):
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    cks = list_checkpoints(ckpt_dir)
    return cks[-1] if cks else None


def step_of(path: str) -> int:
    m = _STEP.search(path.rstrip("/"))
    if not m:
        raise ValueError(f"not a checkpoint directory (expected .../step_N): {path}")
    return int(m.group(1))


def prune(ckpt_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in glob.glob(os.path.join(ckpt_dir, "step_*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
