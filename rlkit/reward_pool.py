"""User reward functions in worker processes that are killed and replaced on timeout.

``reward.isolation: process`` (the default) runs every user reward function (a
``file.py:fn`` or ``module:fn`` entry, a registered name, or a module-level callable)
in a small pool of spawned worker processes, with :class:`pebble.ProcessPool`.  A call
that runs past ``reward.timeout_s`` has its worker *killed* (SIGTERM, then SIGKILL) and a
fresh worker takes its place, so a catastrophic regex or a busy loop cannot hang the run
or keep spinning in the background.  A worker that dies (``os._exit``, a segfault) is
replaced the same way.

Workers import the functions *by reference* (the file path or module path and the
attribute name), never by pickling a closure: :func:`reference` says whether a function
can be named that way.  Each worker imports the configured functions once, at start-up,
so import time never counts against a timeout.  The workers import only what the reward
modules import (a bare ``rlkit`` package is registered, so ``rlkit/__init__`` and torch
are not loaded unless a reward uses a package-level name), and the parent's
``__main__`` is hidden from spawn, so an unguarded training script is not re-run in them.

The call's keyword arguments (the batch columns) are pickled to the worker, so a
function that mutates its inputs cannot touch the trainer's batch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import importlib.util
import inspect
import logging
import multiprocessing.context
import os
import sys
import threading
from typing import Any, Callable, Dict, Optional, Tuple

logger = logging.getLogger(__name__)

POOL_SIZE = 2               # one busy worker and a warm spare (calls are made one at a time)
STARTUP_GRACE_S = 120.0     # a worker that cannot even start within this (plus the timeout) counts as a timeout

Ref = Tuple[str, str, str]  # ("file", abs path, attr) or ("module", module name, attr); the pool adds a 4th
                            # item, the convention (None, or "verl" to wrap a verl compute_score)

_lock = threading.RLock()
_pool = None
_pool_refs: frozenset = frozenset()
stats: Dict[str, int] = {"calls": 0, "timeouts": 0, "crashes": 0, "pool_starts": 0}


class RewardTimeout(Exception):
    pass


class RewardCrash(Exception):
    pass


class RewardExit(Exception):
    """``SystemExit`` / ``KeyboardInterrupt`` raised inside a reward function, contained."""


# ----------------------------------------------------------- naming a function
def reference(fn: Callable) -> Optional[Ref]:
    """How a worker process can import ``fn``, or None (a lambda, a closure, something defined in ``__main__``)."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if not isinstance(mod, str) or not isinstance(qual, str) or "<" in qual or mod == "__main__":
        return None
    module = sys.modules.get(mod)
    if mod.startswith("rlkit_user_reward_"):  # loaded from a file by rlkit.rewarding._load_file
        path = getattr(module, "__file__", None)
        return ("file", os.path.abspath(path), qual) if path else None
    if module is None or getattr(module, "__spec__", None) is None:
        return None
    return ("module", mod, qual)


def describe(ref: Ref) -> str:
    return f"{ref[1]}:{ref[2]}"


# ----------------------------------------------------------- worker side
_cache: Dict[Ref, Any] = {}


def _resolve(ref: Ref) -> Callable:
    fn = _cache.get(ref)
    if fn is None:
        kind, where, attr, convention = ref
        try:
            if kind == "file":
                from rlkit.rewarding import _load_file  # stdlib-only module

                fn = _load_file(where, attr)
            else:
                import importlib

                fn = importlib.import_module(where)
                for part in attr.split("."):
                    fn = getattr(fn, part)
            if convention == "verl":
                from rlkit.rewarding import from_verl

                fn = from_verl(fn)
        except Exception as e:  # noqa: BLE001 - re-raised by the call that needs it
            fn = e
        _cache[ref] = fn
    if isinstance(fn, Exception):
        raise fn
    return fn


def _preload(refs) -> None:
    """Worker initializer: import every configured function once (errors are kept for the call)."""
    for ref in refs:
        try:
            _resolve(tuple(ref))
        except Exception:  # noqa: BLE001
            pass


async def _await(x):
    return await x


def _run(ref: Ref, kwargs: Dict[str, Any]):
    """Runs in a worker: call the function; return plain Python values."""
    out = _resolve(ref)(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple, dict)):
        out = out.tolist()
    return out


_BOOT = """
import sys, types
if "rlkit" not in sys.modules:
    pkg = types.ModuleType("rlkit")
    pkg.__path__ = {paths!r}
    pkg.__package__ = "rlkit"
    pkg.__file__ = {init!r}
    def __getattr__(name, _pkg=pkg):
        # rlkit/__init__ (torch) runs only if a reward module uses a package-level name
        if _pkg.__dict__.get("_rlkit_full_init") or not _pkg.__file__:
            raise AttributeError(name)
        _pkg._rlkit_full_init = True
        with open(_pkg.__file__) as f:
            exec(compile(f.read(), _pkg.__file__, "exec"), _pkg.__dict__)
        return getattr(_pkg, name)
    pkg.__getattr__ = __getattr__
    sys.modules["rlkit"] = pkg
import signal
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a kill on timeout ends the worker at once, even inside C code
from rlkit.reward_pool import _preload
_preload({refs!r})
"""


# ----------------------------------------------------------- caller side
class _HiddenMainStart:
    """A spawn process whose ``start()`` hides the parent's ``__main__`` (pebble starts replacement workers from its
    own thread).  A wrapper, not a subclass: the pickled process object must not name an rlkit class, or the
    child would import rlkit (and torch) just to unpickle it."""

    def __init__(self, process):
        self.__dict__["_process"] = process

    def start(self):
        from . import mathverify  # the same lock and __main__ hiding as math-verify's workers

        with mathverify._lock, mathverify._main_hidden():
            self._process.start()

    def __getattr__(self, name):
        return getattr(self.__dict__["_process"], name)

    def __setattr__(self, name, value):
        setattr(self._process, name, value)


class _Context(multiprocessing.context.SpawnContext):
    def Process(self, *args, **kwargs):  # noqa: N802 - the multiprocessing context API
        return _HiddenMainStart(multiprocessing.context.SpawnProcess(*args, **kwargs))


def _boot_code(refs) -> str:
    spec = importlib.util.find_spec("rlkit")
    paths = list(spec.submodule_search_locations or [os.path.dirname(os.path.abspath(__file__))])
    return _BOOT.format(paths=paths, init=spec.origin or "", refs=sorted(refs, key=repr))


def _get_pool(refs: frozenset):
    global _pool, _pool_refs
    import pebble

    with _lock:
        if _pool is not None and refs <= _pool_refs and _pool.active:
            return _pool
        if _pool is not None:
            stop_pool(_pool)
            if len(_pool_refs) < 64:  # keep what the last pool preloaded: rewarders alternating in one process
                refs = refs | _pool_refs  # (e.g. a test session) then restart the pool at most once each
        _pool = pebble.ProcessPool(max_workers=POOL_SIZE, initializer=exec, initargs=(_boot_code(refs), {}),
                                   context=_Context())
        _pool_refs = refs
        stats["pool_starts"] += 1
        return _pool


def start(refs: frozenset) -> None:
    """Start the workers now (they import the functions in the background, e.g. while the model loads)."""
    _get_pool(frozenset(refs))


def stop_pool(pool) -> None:
    """Stop a pebble pool and wait for its workers (also used by rlkit.mathverify)."""
    try:
        pool.stop()
        pool.join(timeout=10)
    except Exception:  # noqa: BLE001 - already broken
        pass


def _restart(pool) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    stop_pool(pool)


def shutdown() -> None:
    """Stop the worker processes (at exit; the next call starts a new pool)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        stop_pool(pool)


import atexit  # noqa: E402

atexit.register(shutdown)


def worker_pids() -> list:
    """PIDs of the live reward workers (for tests and diagnostics)."""
    with _lock:
        pool = _pool
    if pool is None:
        return []
    workers = getattr(getattr(getattr(pool, "_pool_manager", None), "worker_manager", None), "workers", None) or {}
    return [p.pid for p in list(workers.values()) if p.is_alive()]


class ProcessReward:
    """Calls a reward function in the worker pool; ``reward.timeout_s`` is enforced there by killing the worker."""

    handles_timeout = True  # the Rewarder must not wrap it in a thread

    def __init__(self, fn: Callable, ref: Ref, timeout_s: Optional[float], group: frozenset):
        self.ref, self.timeout_s, self.group = ref, (timeout_s or None), group
        self.__name__ = getattr(fn, "__name__", ref[2])
        self.__doc__ = getattr(fn, "__doc__", None)
        self.group_reward = bool(getattr(fn, "group_reward", False))

    def __repr__(self) -> str:
        return f"<reward {describe(self.ref)} in a worker process>"

    def __call__(self, **kwargs):
        pool = _get_pool(self.group)
        stats["calls"] += 1
        try:
            fut = pool.schedule(_run, args=(self.ref, kwargs), timeout=self.timeout_s)
        except RuntimeError:  # the pool broke (e.g. every worker died at once): start a new one
            _restart(pool)
            pool = _get_pool(self.group)
            fut = pool.schedule(_run, args=(self.ref, kwargs), timeout=self.timeout_s)
        try:  # pebble times the call from when a worker takes it; this outer wait only guards a pool that never starts
            exc = fut.exception(timeout=None if self.timeout_s is None else self.timeout_s + STARTUP_GRACE_S)
        except cf.TimeoutError:
            fut.cancel()
            _restart(pool)
            stats["timeouts"] += 1
            raise RewardTimeout(f"no worker process ran it within {self.timeout_s + STARTUP_GRACE_S:g}s; "
                                "the worker pool was restarted") from None
        if exc is None:
            return fut.result()
        import pebble

        if isinstance(exc, TimeoutError) and exc.args[:1] == ("Task timeout",):
            stats["timeouts"] += 1
            raise RewardTimeout(f"timed out after {self.timeout_s:g}s; its worker process was killed and replaced") from None
        if isinstance(exc, pebble.ProcessExpired):
            stats["crashes"] += 1
            raise RewardCrash(f"its worker process died (exit code {exc.exitcode}); a new one replaces it") from None
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise RewardExit(_exit_message(exc)) from exc
        if isinstance(exc, BrokenProcessPool):  # the next call starts a new pool
            _restart(pool)
        raise exc


def _exit_message(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}); contained (the run goes on), its samples get None"
    return "raised KeyboardInterrupt; contained (the run goes on), its samples get None"
