"""Checkpoints that are atomic, verified, and data only.

Layout of ``<run>/checkpoints/``::

    step_N/model/             HF format (config, safetensors, tokenizer): from_pretrained / vLLM
    step_N/state/             accelerate state: model, optimizer, scheduler, RNG of every rank (random_states_R.pkl)
    step_N/plugins_rankR.pt   each rank's plugin states (prompt-selector position, buffers, value models) and group-id counter
    step_N/rlkit.pt           the step (and rank 0's plugin states)
    step_N/manifest.json      every file above with its size and sha256; written last, it marks a complete checkpoint
    abandoned-<UTC time>/     checkpoints (and metrics/completions lines) of a branch given up by resuming from an
                              older checkpoint, or a damaged checkpoint skipped by ``resume=auto``; never deleted by rlkit

Writing (``Trainer.save_checkpoint``): every file goes to ``step_N.tmp``; each file and directory is fsynced, the
manifest is written and fsynced, ``step_N.tmp`` is renamed to ``step_N`` and the parent directory fsynced.  Weights or
optimizer state that are not finite are never written (``CheckpointError``, earlier checkpoints kept); rlkit's own
files are checked at save time to hold data only (a plugin state with an object of its own class fails then).  Old
checkpoints beyond ``trainer.keep_checkpoints`` are pruned after the new one is complete; if the write fails for
lack of space, the partial ``step_N.tmp`` is removed and, only when that makes enough room, the checkpoints the
keep policy would prune anyway are pruned first and the write retried once; otherwise the run stops with a
one-line ``checkpoint error`` and every earlier checkpoint intact.  Resuming needs no free space (logs are
truncated in place), so ``resume=auto`` on the same disk works.

Reading (``Trainer._maybe_resume``): the manifest is checked (every file present, same size, same sha256, the RNG
state and plugin file of every rank present), every pickle-based file is scanned and refused if it references
anything but tensors/containers/numpy arrays (and DeepSpeed's data classes), and rlkit's own files are read with
``torch.load(weights_only=True)``: resuming loads data, never code.  ``resume=auto`` falls back to the newest intact
checkpoint (a warning names the damaged file); an explicit ``resume=DIR`` that fails the check is a
``CheckpointError`` naming the file.  All of this happens before the model loads.  After loading, the configured
lr (re-basing the scheduler), betas and weight decay are applied, and every checkpoint of the run later than the
resumed step moves to ``abandoned-<UTC time>/`` (a new branch starts; nothing is skipped or overwritten).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Dict, Iterable, List, Optional, Tuple

_STEP = re.compile(r"step_(\d+)$")
MANIFEST = "manifest.json"
FORMAT = 1
PICKLED = (".pt", ".bin", ".pkl")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line naming the file."""


# ------------------------------------------------------------------ listing
def candidates(ckpt_dir: str) -> List[str]:
    """Every ``step_N`` directory (complete or not, intact or not), oldest first."""
    out = []
    for p in glob.glob(os.path.join(ckpt_dir, "step_*")):
        m = _STEP.search(p)
        if m and os.path.isdir(p):
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def list_checkpoints(ckpt_dir: str) -> List[str]:
    """Complete checkpoints (their manifest exists), oldest first.  Not verified: see ``verify``."""
    return [p for p in candidates(ckpt_dir) if os.path.exists(os.path.join(p, MANIFEST))]


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    cks = list_checkpoints(ckpt_dir)
    return cks[-1] if cks else None


def step_of(path: str) -> int:
    m = _STEP.search(path.rstrip("/"))
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected .../step_N)")
    return int(m.group(1))


def dir_size(path: str) -> int:
    return sum(os.path.getsize(f) for f in _files(path))


def prune(ckpt_dir: str, keep: int) -> List[str]:
    """Remove complete checkpoints beyond the newest ``keep`` and stale ``step_*.tmp``; returns what was removed."""
    gone = []
    if keep > 0:
        for p in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    for p in glob.glob(os.path.join(ckpt_dir, "step_*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
    return gone


def room_by_pruning(ckpt_dir: str, keep: int, needed: int) -> List[str]:
    """After a write failed for lack of space: the checkpoints the keep policy would prune once the new one
    exists (all but the newest ``keep - 1``), if removing them frees at least ``needed`` bytes; else []."""
    done = list_checkpoints(ckpt_dir)
    # keep=1: the only intact checkpoint is never deleted before its successor exists
    prunable = done[:-(keep - 1)] if keep > 1 else []
    free = shutil.disk_usage(ckpt_dir).free
    if prunable and free + sum(dir_size(p) for p in prunable) >= needed:
        return prunable
    return []


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


# ------------------------------------------------------------------ writing
def _files(root: str) -> List[str]:
    out = []
    for dp, _, fs in os.walk(root):
        out.extend(os.path.join(dp, f) for f in fs)
    return sorted(out)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            h.update(b)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _hash_and_sync(path: str) -> Tuple[int, str]:
    """sha256 of a file, then fsync it (just written, the data is in the page cache: hashing reads no disk)."""
    return os.path.getsize(path), _sha256(path, fsync=True)


def write_manifest(tmp: str, step: int, world_size: int) -> Dict:
    """Hash and fsync every file under ``tmp``, write ``manifest.json`` (fsynced) and fsync every directory."""
    from concurrent.futures import ThreadPoolExecutor

    files = [f for f in _files(tmp) if os.path.basename(f) != MANIFEST]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:  # hashlib releases the GIL
        sums = list(ex.map(_hash_and_sync, files))
    man = {"format": FORMAT, "step": step, "world_size": world_size,
           "files": {os.path.relpath(f, tmp): {"size": s, "sha256": h} for f, (s, h) in zip(files, sums)}}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for dp, _, _ in os.walk(tmp):
        _fsync_dir(dp)
    return man


def publish(tmp: str, final: str) -> None:
    """Rename the complete ``step_N.tmp`` to ``step_N`` and fsync the parent directory."""
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")


def first_nonfinite(named: Iterable[Tuple[str, "object"]]) -> Optional[str]:
    """Name of the first floating tensor with a NaN/inf, or None."""
    import torch

    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def optimizer_tensors(optimizer) -> Iterable[Tuple[str, "object"]]:
    inner = getattr(optimizer, "optimizer", optimizer)
    for i, st in enumerate(getattr(inner, "state", {}).values()):
        for k, v in (st.items() if isinstance(st, dict) else ()):
            yield f"optimizer state[{i}].{k}", v


# ------------------------------------------------------------------ reading
# DeepSpeed's ZeRO optimizer files name these: plain classes without __setstate__/__reduce__ (unpickling only
# sets their attributes) and an int Enum (unpickling is a value lookup).
DEEPSPEED_DATA_CLASSES = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"}


def _safe_globals() -> set:
    """Globals a data-only pickle may name beyond torch's own weights_only allow-list: the numpy array
    reconstruction accelerate's RNG state needs (accelerate allows exactly these for its own loads) and
    DeepSpeed's data classes above.  Anything else (a function, ``os.system``, ...) is refused."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        names = {f"{g.__module__}.{g.__qualname__}" for g in TORCH_SAFE_GLOBALS}
    except ImportError:  # pragma: no cover - older accelerate
        names = set()
    return names | DEEPSPEED_DATA_CLASSES


def check_pickle(path: str, rel: str) -> None:
    """Refuse a pickle-based file that would import anything but data types when loaded."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        bad = set(get_unsafe_globals_in_checkpoint(path)) - _safe_globals()
    except Exception as e:  # not a torch.save zip archive (rlkit and accelerate never write one)
        raise CheckpointError(f"{rel}: not a torch.save archive ({type(e).__name__}: {_one_line(e)})") from None
    if bad:
        raise CheckpointError(f"{rel}: refusing to load: the pickle references {sorted(bad)} (code, not data); "
                              "a checkpoint is loaded as data only")


def save_data(obj, path: str) -> None:
    """``torch.save`` of rlkit's own state, checked at once to be data that ``load_data`` will accept (a plugin
    whose ``state_dict`` holds an object of its own class fails at its first save, not at resume)."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint

    torch.save(obj, path)
    bad = sorted(set(get_unsafe_globals_in_checkpoint(path)) - _safe_globals())
    if bad:
        raise CheckpointError(f"{path}: a plugin state holds {bad}; a state_dict must be data only (tensors, numbers, "
                              "strings, None, lists, tuples, dicts), since resume loads with weights_only=True")


def load_data(path: str):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples, dicts only."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as data ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def verify(path: str, world_size: int) -> Dict:
    """Check a checkpoint against its manifest; raises ``CheckpointError("<path>/<file>: ...")``."""
    path = path.rstrip("/")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{mpath}: missing (an incomplete checkpoint, or one written before manifests existed)")
    try:
        with open(mpath) as f:
            man = json.load(f)
        files = man["files"]
        assert isinstance(files, dict) and man.get("format") == FORMAT
    except Exception as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(e).__name__}: {_one_line(e)})") from None
    for rel, meta in sorted(files.items()):
        f = os.path.join(path, rel)
        if os.path.isabs(rel) or ".." in rel.split(os.sep):
            raise CheckpointError(f"{mpath}: file entry {rel!r} points outside the checkpoint")
        if not os.path.exists(f):
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        size = os.path.getsize(f)
        if size != meta["size"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta['size']} (truncated or damaged)")
    for rel, meta in sorted(files.items()):
        f = os.path.join(path, rel)
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from {MANIFEST} (damaged)")
    need = ["rlkit.pt"] + [f"plugins_rank{r}.pt" for r in range(world_size)]
    for rel in need:
        if rel not in files:
            raise CheckpointError(f"{os.path.join(path, rel)}: missing")
    for r in range(world_size):
        rel = os.path.join("state", f"random_states_{r}.pkl")
        if rel not in files:
            raise CheckpointError(f"{os.path.join(path, rel)}: missing RNG state of rank {r} "
                                  f"(the checkpoint was written by {man.get('world_size', '?')} process(es)); "
                                  "resuming without it would continue on a different trajectory")
    for rel in sorted(files):
        if rel.endswith(PICKLED):
            check_pickle(os.path.join(path, rel), os.path.join(path, rel))
    return man


def choose(ckpt_dir: str, resume: str, world_size: int) -> Tuple[Optional[str], List[str]]:
    """The checkpoint to resume from and the damaged checkpoints skipped on the way (``"<file>: <why>"``).

    ``resume=auto``: the newest checkpoint that verifies; None when there is none at all; a ``CheckpointError``
    when checkpoints exist but none is intact (starting over silently would discard the run).  An explicit
    directory must verify."""
    if resume != "auto":
        step_of(resume)
        verify(resume, world_size)
        return resume, []
    damaged = []
    for p in reversed(candidates(ckpt_dir)):
        try:
            verify(p, world_size)
            return p, damaged
        except CheckpointError as e:
            damaged.append(str(e))
    if damaged:
        raise CheckpointError(f"resume=auto: no intact checkpoint in {ckpt_dir}: " + "; ".join(damaged))
    return None, []


def move_aside(ckpt_dir: str, paths: List[str]) -> str:
    """Move ``paths`` (checkpoints of an abandoned branch) into ``ckpt_dir/abandoned-<UTC time>/``."""
    dest = os.path.join(ckpt_dir, "abandoned-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    i = 1
    base = dest
    while os.path.exists(dest):
        dest, i = f"{base}-{i}", i + 1
    os.makedirs(dest)
    for p in paths:
        os.replace(p, os.path.join(dest, os.path.basename(p)))
    _fsync_dir(ckpt_dir)
    return dest


def truncate_log(path: str, max_step: int, aside: Optional[str] = None) -> int:
    """Drop the lines of a jsonl log whose ``step`` is past ``max_step`` (and unreadable lines, e.g. the half line
    a kill left).  Truncates in place when the kept lines are a prefix (the normal case: it needs no free disk
    space); ``aside``: append the dropped lines there.  Returns the number of dropped lines."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.readlines()
    keep_flags = []
    for line in lines:
        try:
            keep_flags.append(json.loads(line).get("step", 0) <= max_step)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            keep_flags.append(False)
    dropped = [l for l, k in zip(lines, keep_flags) if not k]
    if not dropped:
        return 0
    if aside is not None:
        with open(aside, "ab") as f:
            f.writelines(dropped)
    n_prefix = keep_flags.index(False)
    if all(not k for k in keep_flags[n_prefix:]):
        with open(path, "r+b") as f:
            f.truncate(sum(len(l) for l in lines[:n_prefix]))
    else:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(l for l, k in zip(lines, keep_flags) if k)
        os.replace(tmp, path)
    return len(dropped)


def apply_optimizer_settings(optimizer, scheduler, lrs: List[float], betas, weight_decay: float) -> List[str]:
    """After loading optimizer/scheduler state: make the configured lr (per param group), betas and
    weight_decay the ones in force (the scheduler's base lrs included, so its schedule is applied to the new
    lr from the restored step).  Returns a description of what changed."""
    groups = optimizer.param_groups
    changed = []
    sched_lambdas = getattr(scheduler, "lr_lambdas", None)
    for i, (g, lr) in enumerate(zip(groups, lrs)):
        old_base = scheduler.base_lrs[i] if hasattr(scheduler, "base_lrs") else g.get("initial_lr", g["lr"])
        if not math.isclose(old_base, lr, rel_tol=1e-12, abs_tol=0.0):
            if sched_lambdas is None:
                raise CheckpointError(f"trainer.lr={lr} differs from the checkpoint's {old_base} and the "
                                      f"{type(scheduler).__name__} scheduler cannot be re-based; resume with the same lr")
            changed.append(f"lr{'' if i == 0 else f'[group {i}]'} {old_base:g} -> {lr:g}")
            scheduler.base_lrs[i] = lr
            g["initial_lr"] = lr
        if tuple(g.get("betas", betas)) != tuple(betas):
            changed.append(f"adam_betas {list(g['betas'])} -> {list(betas)}")
            g["betas"] = tuple(betas)
        if g.get("weight_decay", weight_decay) != weight_decay:
            changed.append(f"weight_decay {g['weight_decay']:g} -> {weight_decay:g}")
            g["weight_decay"] = weight_decay
    if sched_lambdas is not None and any(c.startswith("lr") for c in changed):
        for g, base, lam in zip(groups, scheduler.base_lrs, sched_lambdas):
            g["lr"] = base * lam(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in groups]
    return changed
