"""Reward functions: resolving them from the recipe, and calling them on a batch.

Reward functions follow TRL's keyword convention::

    def my_reward(completions, answer, **kwargs) -> list[float | None]: ...

They receive ``prompts``, ``completions`` (strings), ``completion_ids`` and every
dataset column by name (lists, one entry per completion), plus ``**kwargs``.
``None`` means "not applicable": it becomes NaN and is left out of the weighted
sum.  A function may return a dict per sample (``{"score": x, "other": y}``, verl
style) or a dict of lists; ``score`` is the reward and the other keys are logged as
``<name>/<key>``.  A function with ``fn.group_reward = True`` is called once per
prompt group with that group's slices (e.g. majority voting).

``reward.functions`` entries in a recipe may be

* a built-in name: ``gsm8k_strict``, ``gsm8k_flexible``, ``math_verify``, ``format_gsm8k``,
  ``format_boxed``, ``length_penalty``, ``majority_vote`` (or a name registered with
  :func:`rlkit.registry.register_reward`);
* ``"path/to/file.py:fn"`` (relative to the working directory);
* ``"package.module:fn"`` (an import path);
* a mapping ``{name: <any of the above>, weight: 0.5, <param>: <value>, ...}`` whose
  extra keys are bound as keyword arguments (``path:`` may be used instead of
  ``name:``); ``convention: verl`` wraps a verl ``compute_score`` with :func:`from_verl`.

Isolation and timeouts (``reward.isolation``): with ``process`` (the default) every
user function runs in a worker process (:mod:`rlkit.reward_pool`) that is killed and
replaced when a call exceeds ``reward.timeout_s``; with ``thread`` each call runs in a
daemon thread that is abandoned on timeout (Python cannot kill a thread, so a function
that hangs keeps its thread until the process exits); with ``none`` it is called
directly, without a timeout.  Built-in rewards always run in the trainer process.  A
timed-out call's samples get ``None`` and are counted in ``reward/<name>/timeouts``.
``SystemExit`` (and, except with ``none``, ``KeyboardInterrupt``) raised by a function
is contained and counted as an error; ±inf scores become ``None`` and are counted in
``reward/<name>/nonfinite``; every function gets its own copies of the columns.
math-verify checks have their own timeout in a worker process pool that *is*
killed (see :mod:`rlkit.mathverify`).  A function that bounds its own time sets
``fn.handles_timeout = True`` (as ``math_verify`` does) and is called directly: a batch
of slow-but-finite checks then completes instead of being dropped as a whole.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .registry import REWARDS, suggest
from .reward_pool import ProcessReward, RewardCrash, RewardExit, RewardTimeout, _exit_message  # noqa: F401

logger = logging.getLogger(__name__)

BUILTIN_REWARDS: Dict[str, str] = {
    "gsm8k_strict": "rlkit.builtin_rewards.gsm8k:gsm8k_strict",
    "gsm8k_flexible": "rlkit.builtin_rewards.gsm8k:gsm8k_flexible",
    "math_verify": "rlkit.builtin_rewards.math:math_verify",
    "format_gsm8k": "rlkit.builtin_rewards.format:format_gsm8k",
    "format_boxed": "rlkit.builtin_rewards.format:format_boxed",
    "length_penalty": "rlkit.builtin_rewards.length:length_penalty",
    "majority_vote": "rlkit.builtin_rewards.majority_vote:majority_vote",
    "length_budget": "rlkit.builtin_rewards.length_budget:length_budget",
}
_BUILTIN_DOCS = {
    "gsm8k_strict": "1 if the last '#### N' (last 300 chars) equals the gold answer (verl strict)",
    "gsm8k_flexible": "1 if the last number in the completion equals the gold answer (verl flexible)",
    "math_verify": "1 if the answer is mathematically equal to the gold answer (math-verify, process pool)",
    "format_gsm8k": "1 if a strict '#### N' answer is present",
    "format_boxed": "1 if a complete \\boxed{...} is present",
    "length_penalty": "linear penalty past target_length tokens, down to -scale at max_length",
    "majority_vote": "group reward: 1 if the boxed answer equals the group's majority (MM-UPT, no labels)",
    "length_budget": "triangular length reward, peak at the budget set by the length_budget controller",
}
# columns that TRL passes under their plural names instead
_RESERVED = ("prompt", "completion", "completion_ids", "prompts", "completions")
# keys of a mapping spec that are not keyword arguments of the function
_SPEC_KEYS = ("name", "path", "weight", "convention")


class BuiltinReward:
    """A lazy handle on a built-in reward, registered in ``REWARDS`` without importing it."""

    group_reward = False

    def __init__(self, name: str, target: str, doc: str = ""):
        self.name = name
        self.target = target
        self.__doc__ = doc

    def load(self) -> Callable:
        return _import_target(self.target)

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<built-in reward {self.name} -> {self.target}>"


for _name, _target in BUILTIN_REWARDS.items():
    REWARDS.register(_name)(BuiltinReward(_name, _target, _BUILTIN_DOCS.get(_name, "")))


# ------------------------------------------------------------------ resolving
@dataclass
class RewardFn:
    """A resolved reward function: ``fn`` follows the TRL convention."""
    name: str
    fn: Callable
    is_group: bool = False
    weight: float = 1.0
    spec: Any = None


def _import_target(target: str) -> Callable:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _load_file(path: str, attr: str) -> Callable:
    obj = _load_file_module(path)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _load_file_module(path: str):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"reward file not found: {path} (looked for {full})")
    stem = os.path.splitext(os.path.basename(full))[0]
    modname = f"rlkit_user_reward_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    mod = sys.modules.get(modname)
    if mod is None:
        from .overrides import exec_file_as_module

        mod = exec_file_as_module(modname, full)
    return mod


def _split_spec(spec: Any):
    """-> (target string or callable, weight or None, bound kwargs, convention)."""
    if isinstance(spec, dict):
        target = spec.get("name", spec.get("path"))
        weight = spec.get("weight")
        kwargs = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
        return target, weight, kwargs, spec.get("convention")
    return spec, None, {}, None


def _base_fn(fn: Callable) -> Callable:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def resolve_reward(spec: Any, weight: Optional[float] = None) -> RewardFn:
    """Turn one ``reward.functions`` entry (or a callable) into a :class:`RewardFn`."""
    target, spec_weight, kwargs, convention = _split_spec(spec)
    if isinstance(target, BuiltinReward):
        fn, name = target.load(), target.name
    elif callable(target):
        fn, name = target, getattr(_base_fn(target), "__name__", None) or type(target).__name__
    elif isinstance(target, str) and target:
        fn, name = _resolve_target(target)
    else:
        raise ValueError(f"a reward function is a name, 'file.py:fn', 'module:fn' or a mapping with name:, got {spec!r}")
    if isinstance(fn, BuiltinReward):
        fn = fn.load()
    if convention == "verl":
        fn = from_verl(fn, name=name)
    elif convention not in (None, "trl"):
        raise ValueError(f"unknown reward convention {convention!r} (use 'trl' or 'verl')")
    is_group = bool(getattr(_base_fn(fn), "group_reward", False) or getattr(fn, "group_reward", False))
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    if weight is None:
        weight = 1.0 if spec_weight is None else float(spec_weight)
    return RewardFn(name=name, fn=fn, is_group=is_group, weight=float(weight), spec=spec)


def _resolve_target(target: str):
    if ":" in target:
        where, attr = target.rsplit(":", 1)
        if _is_file_spec(where):
            return _load_file(where, attr), attr.split(".")[-1]
        return _import_target(target), attr.split(".")[-1]
    if target in BUILTIN_REWARDS:
        return _import_target(BUILTIN_REWARDS[target]), target
    if target in REWARDS:
        return REWARDS.get(target), target
    if "." in target:  # "package.module.fn", as TRL's CLI accepts
        module, attr = target.rsplit(".", 1)
        return _import_target(f"{module}:{attr}"), attr
    raise ValueError(f"unknown reward function {target!r}." + suggest(target, REWARDS.names())
                     + f" Built-in: {sorted(BUILTIN_REWARDS)}")


# ----------------------------------------------------------------- validation
def _check_import(where: str, attr: str, key: str, what: str):
    """Import a user reward's file or module (its top level runs here, once) and look the name up: one-line
    errors for a syntax error, a failing import, a missing or non-callable name.  Returns the function."""
    from .config import ConfigError

    try:
        obj = _load_file_module(where) if _is_file_spec(where) else importlib.import_module(where)
    except SyntaxError as e:
        raise ConfigError(f"{key}: {what} has a syntax error: {e}") from None
    except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt at import time included
        msg = " ".join(str(e).split())
        raise ConfigError(f"{key}: importing {what} failed: {type(e).__name__}: {msg}"[:500]) from None
    module = obj
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
            raise ConfigError(f"{key}: {what} has no function {part!r}." + suggest(part, defined)
                              + (f" Functions there: {defined}" if defined else ""))
        obj = getattr(obj, part)
    if isinstance(obj, BuiltinReward):
        obj = obj.load()
    if not callable(obj):
        raise ConfigError(f"{key}: '{where}:{attr}' in {what} is a {type(obj).__name__}, not a function")
    return obj


def _check_kwargs(kwargs: Dict[str, Any], params, key: str, name: str, strict_names: bool):
    from .config import ConfigError

    if not kwargs or params is None:
        return
    names, has_var_kw = params
    named = [n for n in names if n not in ("prompts", "completions", "completion_ids")]
    unknown = [k for k in kwargs if k not in named]
    if unknown and (strict_names or not has_var_kw):
        raise ConfigError(f"{key}: reward {name!r} has no parameter {unknown[0]!r}." + suggest(unknown[0], named)
                          + f" Parameters: {named}")


def validate_reward_specs(reward_cfg: Any) -> None:
    """Check every ``reward.functions`` entry, before any model loads.

    Files must exist; user files, modules and built-ins are imported (a user module's top
    level runs once, here; a built-in's import is cheap, math-verify itself loads in its
    workers), the named attribute must exist (a typo is named with suggestions) and be
    callable, and bound parameters are checked against ``inspect.signature``.  Raises
    :class:`rlkit.config.ConfigError` naming ``reward.functions[i]`` and the file or module.
    """
    from .config import ConfigError

    functions = list(getattr(reward_cfg, "functions", None) or [])
    weights = getattr(reward_cfg, "weights", None)
    if not functions:
        raise ConfigError("reward.functions is empty: give at least one reward function (e.g. gsm8k_strict)")
    if weights is not None and len(weights) != len(functions):
        raise ConfigError(f"reward.weights has {len(weights)} entries but reward.functions has {len(functions)}")
    timeout = getattr(reward_cfg, "timeout_s", None)
    if timeout is not None and timeout < 0:
        raise ConfigError(f"reward.timeout_s must be >= 0 (0 = no timeout), got {timeout}")
    for i, spec in enumerate(functions):
        key = f"reward.functions[{i}]"
        target, w, kwargs, convention = _split_spec(spec)
        if isinstance(spec, dict) and "name" in spec and "path" in spec:
            raise ConfigError(f"{key}: give either name: or path:, not both")
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ConfigError(f"{key}.weight: expected a number, got {w!r}")
            if weights is not None and float(weights[i]) != float(w):
                raise ConfigError(f"{key}.weight ({w}) disagrees with reward.weights[{i}] ({weights[i]})")
        if convention not in (None, "trl", "verl"):
            raise ConfigError(f"{key}.convention: must be 'trl' or 'verl', got {convention!r}")
        if callable(target):
            continue
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{key}: expected a reward name, 'file.py:fn', 'module:fn' or "
                              f"{{name: ..., weight: ...}}, got {spec!r}")
        if ":" in target:
            where, attr = target.rsplit(":", 1)
            if not attr:
                raise ConfigError(f"{key}: {target!r} names no function after ':'")
            if _is_file_spec(where):
                if not os.path.isfile(where):
                    raise ConfigError(f"{key}: reward file not found: {where} (relative to {os.getcwd()})")
                fn = _check_import(where, attr, key, f"reward file {where}")
            else:
                _check_module(where, key)
                fn = _check_import(where, attr, key, f"module {where}")
            _check_kwargs(kwargs, _signature_params(fn), key, target, strict_names=False)
        elif target in BUILTIN_REWARDS:
            module, _, attr = BUILTIN_REWARDS[target].partition(":")
            fn = _check_import(module, attr, key, f"built-in {target}")
            _check_kwargs(kwargs, _signature_params(fn), key, target, strict_names=True)
        elif target in REWARDS:
            fn = REWARDS.get(target)
            _check_kwargs(kwargs, _signature_params(fn), key, target, strict_names=False)
        elif _is_file_spec(target):
            raise ConfigError(f"{key}: {target!r}: name the function too, as 'path/to/file.py:function'")
        elif "." in target:
            module, attr = target.rsplit(".", 1)
            _check_module(module, key)
            fn = _check_import(module, attr, key, f"module {module}")
            _check_kwargs(kwargs, _signature_params(fn), key, target, strict_names=False)
        else:
            raise ConfigError(f"{key}: unknown reward function {target!r}." + suggest(target, REWARDS.names())
                              + f" Built-in: {sorted(BUILTIN_REWARDS)}; or give 'file.py:fn' / 'module:fn'.")


def _check_module(module: str, key: str) -> None:
    from .config import ConfigError

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        spec = None
        err = f" ({e})"
    else:
        err = ""
    if spec is None:
        raise ConfigError(f"{key}: cannot find module {module!r}{err}")


def _signature_params(fn):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


# ---------------------------------------------------------------- verl adapter
def from_verl(compute_score: Callable, name: Optional[str] = None, ground_truth_key: Optional[str] = None) -> Callable:
    """Wrap a verl ``compute_score(data_source, solution_str, ground_truth, extra_info)`` as a TRL-style function.

    The ground truth is read from ``ground_truth_key`` if given, else from the first of
    ``reward_model["ground_truth"]`` (verl's parquet layout), ``ground_truth``, ``answer``
    and ``solution``.  A returned dict (``{"score": ..., ...}``) is kept, so its extra keys are logged.
    """

    def reward(completions, **kwargs):
        n = len(completions)
        gts = _verl_ground_truth(kwargs, n, ground_truth_key)
        sources = kwargs.get("data_source") or [None] * n
        extras = kwargs.get("extra_info") or [None] * n
        from .answers import completion_text

        return [compute_score(sources[i], completion_text(completions[i]), gts[i], extras[i]) for i in range(n)]

    reward.__name__ = name or getattr(compute_score, "__name__", "compute_score")
    if ground_truth_key is None:
        reward._verl_compute_score = compute_score  # a worker process rebuilds this adapter from it
    reward.__doc__ = f"verl compute_score {reward.__name__} adapted to the TRL convention"
    return reward


def _verl_ground_truth(kwargs, n, key):
    if key is not None:
        return kwargs[key]
    rm = kwargs.get("reward_model")
    if rm is not None:
        return [r.get("ground_truth") if isinstance(r, dict) else None for r in rm]
    for k in ("ground_truth", "answer", "solution"):
        if kwargs.get(k) is not None:
            return kwargs[k]
    return [None] * n


# ------------------------------------------------------------------- calling
@dataclass
class RewardResult:
    rewards: Any                              # torch.Tensor [S] float32, weighted nansum; NaN where all None
    components: Dict[str, Any] = field(default_factory=dict)   # name -> Tensor [S] (NaN where None)
    metrics: Dict[str, float] = field(default_factory=dict)


class RewardError(RuntimeError):
    """A reward function failed with ``reward.strict=true`` (one line: ``reward error: ...``)."""

    kind = "reward"


def _call_with_timeout(fn: Callable, kwargs: Dict[str, Any], timeout_s: Optional[float]):
    def run():
        try:
            out = fn(**kwargs)
            if inspect.isawaitable(out):
                out = asyncio.run(_await(out))
        except SystemExit as e:  # contained: sys.exit() in a reward must not end training (with exit code 0)
            raise RewardExit(_exit_message(e)) from e
        return out

    if not timeout_s or timeout_s <= 0:
        return run()  # in the caller's thread: a KeyboardInterrupt here may be the user's Ctrl-C, so it propagates
    box: Dict[str, Any] = {}

    def target():
        try:
            box["out"] = run()
        except KeyboardInterrupt as e:  # raised by the function itself (Ctrl-C lands in the main thread)
            box["err"] = RewardExit(_exit_message(e))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["err"] = e

    t = threading.Thread(target=target, name=f"reward-{getattr(_base_fn(fn), '__name__', 'fn')}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RewardTimeout(f"timed out after {timeout_s:g}s (its thread keeps running in the background)")
    if "err" in box:
        raise box["err"]
    return box["out"]


async def _await(x):
    return await x


def _to_float(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, (str, bytes)):
        raise TypeError(f"not a number: {v!r}")
    if hasattr(v, "item"):  # numpy / torch scalar
        v = v.item()
    return float(v)


class Rewarder:
    """Calls the configured reward functions on a batch and combines them.

    ``Rewarder(cfg.reward)(prompts, completions, completion_ids, columns, group_ids)``
    returns a :class:`RewardResult`.  A function that raises or times out is logged
    (with its traceback, the first time), counted in ``reward/<name>/errors`` or
    ``reward/<name>/timeouts``, and its samples get ``None``; with ``reward.strict``
    it raises ``RuntimeError`` instead.
    """

    def __init__(self, reward_cfg: Any, functions: Optional[Sequence[Any]] = None):
        if isinstance(reward_cfg, dict):
            from .config import RewardConfig

            reward_cfg = RewardConfig(**reward_cfg)
        self.cfg = reward_cfg
        specs = list(functions if functions is not None else reward_cfg.functions)
        weights = getattr(reward_cfg, "weights", None)
        if weights is not None and len(weights) != len(specs):
            raise ValueError(f"reward.weights has {len(weights)} entries but there are {len(specs)} reward functions")
        self.functions: List[RewardFn] = []
        seen: Dict[str, int] = {}
        for i, spec in enumerate(specs):
            rf = resolve_reward(spec, None if weights is None else weights[i])
            if rf.name in seen:  # two entries of the same function (different params): keep logs apart
                seen[rf.name] += 1
                rf.name = f"{rf.name}_{seen[rf.name]}"
            else:
                seen[rf.name] = 1
            self.functions.append(rf)
        self.timeout_s = getattr(reward_cfg, "timeout_s", None)
        self.strict = bool(getattr(reward_cfg, "strict", False))
        self._warned: set = set()
        self.totals: Dict[str, Dict[str, int]] = {f.name: {"errors": 0, "timeouts": 0, "nonfinite": 0}
                                                  for f in self.functions}
        self.isolation = getattr(reward_cfg, "isolation", None) or "process"
        if self.isolation not in ("process", "thread", "none"):
            raise ValueError(f"reward.isolation must be 'process', 'thread' or 'none', got {self.isolation!r}")
        if self.isolation == "process":
            isolate_functions(self.functions, self.timeout_s)

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.functions]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Optional[Sequence[Any]] = None,
                 columns: Optional[Dict[str, Sequence[Any]]] = None, group_ids: Optional[Sequence[int]] = None,
                 **extra: Any) -> RewardResult:
        """Score ``S`` completions.  ``columns`` holds dataset columns (one entry per completion);
        ``extra`` keyword arguments (e.g. ``trainer_state``) are passed to every function as is."""
        import torch

        S = len(completions)
        columns = {k: v for k, v in (columns or {}).items() if k not in _RESERVED}
        base = dict(columns)
        base.update(extra)
        base.update(prompts=list(prompts), completions=list(completions),
                    completion_ids=None if completion_ids is None else list(completion_ids))
        components: Dict[str, Any] = {}
        metrics: Dict[str, float] = {}
        main_cols = []
        for rf in self.functions:
            values: List[Any] = [None] * S
            errors = timeouts = 0
            if rf.is_group:
                gids = list(group_ids) if group_ids is not None else [0] * S
                if len(gids) != S:
                    raise ValueError(f"group_ids has {len(gids)} entries for {S} completions")
                groups: Dict[Any, List[int]] = {}
                for i, g in enumerate(gids):
                    groups.setdefault(g, []).append(i)
                calls = [(idx, _slice(base, idx, S)) for idx in groups.values()]
            else:
                calls = [(list(range(S)), base)]
            for idx, kwargs in calls:
                out, err = self._call(rf, kwargs, len(idx))
                if err == "timeout":
                    timeouts += 1
                elif err:
                    errors += 1
                if out is not None:
                    for j, i in enumerate(idx):
                        values[i] = out[j]
            main, subs = _split_values(values)
            main, nonfinite = self._drop_nonfinite(rf, main)  # ±inf: counted, scored None (never a NaN reward/mean)
            t = torch.tensor([_to_float(v) for v in main], dtype=torch.float32)
            components[rf.name] = t
            main_cols.append(t)
            metrics[f"reward/{rf.name}/errors"] = float(errors)
            metrics[f"reward/{rf.name}/timeouts"] = float(timeouts)
            metrics[f"reward/{rf.name}/nonfinite"] = float(nonfinite)
            metrics[f"reward/{rf.name}/skipped_frac"] = float(torch.isnan(t).float().mean().item()) if S else 0.0
            # reward/<name>/mean and /std (and those of dict sub-scores) are computed by the trainer from the
            # components, weighted by sample counts across ranks
            for key, vals in subs.items():
                st = torch.tensor([_to_float(v) for v in vals], dtype=torch.float32)
                st[torch.isinf(st)] = math.nan
                components[f"{rf.name}/{key}"] = st
            self.totals[rf.name]["errors"] += errors
            self.totals[rf.name]["timeouts"] += timeouts
            self.totals[rf.name]["nonfinite"] = self.totals[rf.name].get("nonfinite", 0) + nonfinite
        if not main_cols:
            return RewardResult(torch.zeros(S), components, metrics)
        stacked = torch.stack(main_cols, dim=0)                      # [F, S]
        w = torch.tensor([f.weight for f in self.functions], dtype=torch.float32).unsqueeze(1)
        rewards = torch.nansum(stacked * w, dim=0)
        counted = stacked[(w.squeeze(1) != 0)] if bool((w != 0).any()) else stacked
        all_none = torch.isnan(counted).all(dim=0)
        rewards = torch.where(all_none, torch.full_like(rewards, math.nan), rewards)
        return RewardResult(rewards, components, metrics)

    def _drop_nonfinite(self, rf: RewardFn, main: List[Any]):
        """±inf scores become None (NaN = None already means "not applicable"); -> (values, how many)."""
        bad = [i for i, v in enumerate(main) if isinstance(v, float) and math.isinf(v)]
        if not bad:
            return main, 0
        if self.strict:
            raise RewardError(f"reward function {rf.name!r} returned {main[bad[0]]} for sample {bad[0]} "
                              f"(set reward.strict=false to count non-finite rewards and skip those samples)")
        if (rf.name, "inf") not in self._warned:
            self._warned.add((rf.name, "inf"))
            logger.warning("reward function %r returned %s for %d of %d samples; they get None (counted in "
                           "reward/%s/nonfinite; further ones are only counted)", rf.name, main[bad[0]], len(bad),
                           len(main), rf.name)
        main = list(main)
        for i in bad:
            main[i] = None
        return main, len(bad)

    def _call(self, rf: RewardFn, kwargs: Dict[str, Any], n: int):
        """-> (list of n values or None, None | "error" | "timeout")."""
        if isinstance(rf.fn, functools.partial):  # recipe-bound params win over same-named columns
            kwargs = {k: v for k, v in kwargs.items() if k not in rf.fn.keywords}
        base = _base_fn(rf.fn)
        timeout = None if self.isolation == "none" or getattr(base, "handles_timeout", False) else self.timeout_s
        if not isinstance(base, ProcessReward):  # (a worker gets pickled copies anyway)
            kwargs = _copy_columns(kwargs)       # a function that mutates its inputs cannot corrupt the batch
        try:
            out = _call_with_timeout(rf.fn, kwargs, timeout)
            out = [_clean_value(v) for v in _check_output(out, n)]
            return out, None
        except Exception as e:  # noqa: BLE001
            kind = "timeout" if isinstance(e, RewardTimeout) else "error"
            if self.strict:
                raise RewardError(f"reward function {rf.name!r} {'timed out' if kind == 'timeout' else 'raised'}: "
                                  f"{e!r} (set reward.strict=false to skip its samples instead)") from e
            if rf.name not in self._warned:
                self._warned.add(rf.name)
                tb = "" if kind == "timeout" else "\n" + "".join(traceback.format_exception(e))
                logger.warning("reward function %r %s; its %d samples get None (counted in reward/%s/%ss; "
                               "further failures are only counted)%s", rf.name,
                               f"timed out: {e}" if kind == "timeout" else f"raised {e!r}", n, rf.name, kind, tb)
            return None, kind


def isolate_functions(functions: List[RewardFn], timeout_s: Optional[float]) -> None:
    """``reward.isolation=process``: route every user function to the worker pool (:mod:`rlkit.reward_pool`).

    Built-in rewards (rlkit's own, bounded code) and functions that bound their own time (``handles_timeout``,
    e.g. ``math_verify``, which has its own killed-on-timeout pool) stay in the trainer process; so does a
    function a worker cannot import by name (a lambda, a closure, something defined in ``__main__``), with a
    warning."""
    from . import reward_pool

    plan = []
    for rf in functions:
        fn = rf.fn
        bound = dict(fn.keywords) if isinstance(fn, functools.partial) else {}
        base = _base_fn(fn)
        if getattr(base, "handles_timeout", False) or isinstance(base, reward_pool.ProcessReward):
            continue
        source, convention = getattr(base, "_verl_compute_score", None), None
        if source is not None:
            base, convention = source, "verl"
        if (getattr(base, "__module__", None) or "").startswith("rlkit.builtin_rewards"):
            continue
        ref = reward_pool.reference(base)
        if ref is None:
            logger.warning("reward function %r cannot be imported by name in a worker process (a lambda, a closure "
                           "or a function defined in __main__): it runs in a thread of the trainer process, where a "
                           "timeout abandons it but cannot stop it (define it in a file and give 'file.py:fn')", rf.name)
            continue
        plan.append((rf, base, ref + (convention,), bound))
    if plan:
        try:
            import pebble  # noqa: F401
        except ImportError:
            from .config import ConfigError

            raise ConfigError("reward.isolation=process needs the 'pebble' package (a dependency of rlkit: "
                              "pip install pebble), or set reward.isolation=thread") from None
    group = frozenset(ref for _, _, ref, _ in plan)
    for rf, base, ref, bound in plan:
        proxy = reward_pool.ProcessReward(base, ref, timeout_s, group)
        rf.fn = functools.partial(proxy, **bound) if bound else proxy
    if group:
        reward_pool.start(group)  # spawn and import now, not at the first reward call


_ATOMIC = (str, bytes, int, float, bool, type(None))


def _copy_columns(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Per-call copies of list / dict / tensor arguments (other objects, e.g. ``trainer_state``, are passed as is)."""
    import copy

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, _ATOMIC) else list(x) if isinstance(x, list) and all(isinstance(y, _ATOMIC) for y in x)
                 else copy.deepcopy(x) for x in v]
        elif isinstance(v, dict):
            v = copy.deepcopy(v)
        elif hasattr(v, "clone") and hasattr(v, "shape"):  # torch tensor
            v = v.clone()
        elif hasattr(v, "copy") and hasattr(v, "shape"):  # numpy array
            v = v.copy()
        out[k] = v
    return out


def _slice(base: Dict[str, Any], idx: List[int], S: int) -> Dict[str, Any]:
    out = {}
    for k, v in base.items():
        if isinstance(v, (list, tuple)) and len(v) == S:
            out[k] = [v[i] for i in idx]
        elif hasattr(v, "shape") and getattr(v, "ndim", 0) >= 1 and len(v) == S:  # tensors / arrays
            out[k] = v[idx]
        else:
            out[k] = v
    return out


def _check_output(out: Any, n: int) -> List[Any]:
    if isinstance(out, dict):  # a dict of lists: {"score": [...], "other": [...]}
        if "score" not in out:
            raise ValueError(f"a reward returning a dict of lists needs a 'score' key, got keys {sorted(out)}")
        cols = {k: _check_output(v, n) for k, v in out.items()}
        return [{k: cols[k][i] for k in cols} for i in range(n)]
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"a reward function must return a list with one value per completion, got {type(out).__name__}")
    if len(out) != n:
        raise ValueError(f"a reward function returned {len(out)} values for {n} completions")
    return list(out)


def _clean_value(v: Any) -> Any:
    """A float (NaN for None), or a dict with a float 'score' and float extras (NaN if not numeric)."""
    if isinstance(v, dict):
        if "score" not in v:
            raise ValueError(f"a reward returning dicts needs a 'score' key, got keys {sorted(v)}")
        out = {"score": _to_float(v["score"])}
        for k, x in v.items():
            if k != "score":
                try:
                    out[k] = _to_float(x)
                except (TypeError, ValueError):
                    pass  # text extras (e.g. the parsed answer) are not logged
        return out
    try:
        return _to_float(v)
    except (TypeError, ValueError):
        raise TypeError(f"a reward value must be a number, None or a dict with 'score', got {v!r}") from None


def _split_values(values: List[Any]):
    """Per-sample values (numbers, None, or dicts with 'score') -> main list + {key: list}."""
    keys: List[str] = []
    for v in values:
        if isinstance(v, dict):
            for k in v:
                if k != "score" and k not in keys:
                    keys.append(k)
    main = [v.get("score") if isinstance(v, dict) else v for v in values]
    subs = {k: [v.get(k) if isinstance(v, dict) else None for v in values] for k in keys}
    return main, subs


def _nanmean(t) -> float:
    import torch

    ok = ~torch.isnan(t)
    return float(t[ok].mean().item()) if bool(ok.any()) else math.nan
