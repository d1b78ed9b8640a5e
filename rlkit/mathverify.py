"""math-verify in worker processes, with a timeout the caller controls.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's
main thread, and a pathological expression can keep sympy busy for minutes.  So
every check runs in a spawn-context :class:`pebble.ProcessPool` (created lazily,
``min(2, cpu_count)`` workers by default; the same library as the user-reward pool,
:mod:`rlkit.reward_pool`).  Each check is scheduled with its own timeout, counted from
when a worker takes it; pebble kills a worker whose check runs past it and starts a
replacement, so a stuck worker never hangs the caller; that check returns ``None``.

    math_equal("\\\\frac{1}{2}", "0.5")             # True
    math_equal_many([("2", "\\\\boxed{3}")])         # [False]

The gold answer is wrapped as ``\\boxed{gold}`` and parsed with LaTeX extraction;
the prediction is parsed with LaTeX + expression extraction (as verl and TRL do).

Workers are cheap: they import only this module and math-verify (not torch, not the
caller's ``__main__``, so an unguarded training script is not re-run in them), and
start-up never counts against a timeout (pebble's clock starts when a worker takes the check).
The pool is shut down at exit (``shutdown()``); ``configure(max_workers=...)`` resizes it.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import logging
import os
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 120.0  # spawning a worker and importing sympy is not charged to a check's timeout

_lock = threading.RLock()
_pool = None   # pebble.ProcessPool
_max_workers: Optional[int] = None
stats: Dict[str, int] = {"calls": 0, "timeouts": 0, "errors": 0, "pool_restarts": 0}  # pool_restarts: workers killed


def configure(max_workers: Optional[int] = None) -> None:
    """Set the number of worker processes (default ``min(2, cpu_count)``); restarts the pool."""
    global _max_workers
    with _lock:
        _max_workers = max_workers
        shutdown()


# ----------------------------------------------------------- worker side
# Run first in every worker (as ``exec(_WORKER_BOOT, {})``, so nothing of rlkit has to be
# unpickled to start one).  It registers a bare ``rlkit`` package, so unpickling the
# checks imports only this stdlib-only module and not ``rlkit/__init__`` (which pulls in
# torch: seconds of start-up and hundreds of MB per worker), then imports math-verify.
_WORKER_BOOT = """
import sys, types
if "rlkit" not in sys.modules:
    pkg = types.ModuleType("rlkit")
    pkg.__path__ = [{pkg_dir!r}]
    sys.modules["rlkit"] = pkg
import math_verify
"""


def _check(gold: str, pred: str, inner_timeout: int) -> Optional[bool]:
    """Runs in a worker process (main thread, so math-verify's alarms work)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=[LatexExtractionConfig()],
                        fallback_mode="no_fallback", parsing_timeout=inner_timeout)
    if not gold_parsed:
        return None
    pred_parsed = parse(pred, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        fallback_mode="no_fallback", parsing_timeout=inner_timeout)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=inner_timeout))


# ----------------------------------------------------------- caller side
@contextlib.contextmanager
def _main_hidden():
    """Hide ``__main__`` from spawn, so a worker does not re-run the user's script.

    A spawned child normally re-imports the parent's main module, which re-runs a
    training script that lacks an ``if __name__ == "__main__":`` guard.  The
    workers only need this module, so they skip that step.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            if "__spec__" in saved:
                main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _new_pool():
    import pebble

    from .reward_pool import _Context  # spawn workers with __main__ hidden, also the replacements pebble starts

    n = _max_workers or max(1, min(2, os.cpu_count() or 1))
    boot = _WORKER_BOOT.format(pkg_dir=os.path.dirname(os.path.abspath(__file__)))
    return pebble.ProcessPool(max_workers=n, initializer=exec, initargs=(boot, {}), context=_Context())


def _get_pool():
    global _pool
    with _lock:
        if _pool is None or not _pool.active:
            _pool = _new_pool()
        return _pool


def shutdown() -> None:
    """Stop the worker processes (called at exit; the next check starts a new pool)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        from .reward_pool import stop_pool

        stop_pool(pool)


atexit.register(shutdown)


def math_equal_many(pairs: Sequence[Tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S,
                    checker: Optional[Callable[[str, str, int], Optional[bool]]] = None,
                    boxed_pred: bool = False) -> List[Optional[bool]]:
    """Check ``(gold, prediction)`` pairs; ``None`` where the check timed out, failed,
    or the gold answer cannot be parsed.  Each pair gets ``timeout_s`` seconds.

    The prediction is a completion (its final ``\\boxed{}``, ``$...$`` or expression is
    found); with ``boxed_pred=True`` it is a bare answer (e.g. the content of a box,
    ``"3\\pi"``) and is wrapped in ``\\boxed{}`` first, since bare LaTeX parses poorly.

    ``checker(gold, pred, inner_timeout_s)`` replaces the math-verify check; it runs in
    the workers, so it must be a module-level function importable there.
    """
    check = checker or _check
    pairs = [(str(g), "\\boxed{" + str(p) + "}" if boxed_pred else str(p)) for g, p in pairs]
    results: List[Optional[bool]] = [None] * len(pairs)
    if not pairs:
        return results
    inner = max(1, int(timeout_s))
    try:
        pool = _get_pool()
        futs = [pool.schedule(check, args=(g, p, inner), timeout=timeout_s) for g, p in pairs]
    except Exception as e:  # noqa: BLE001 - the pool cannot start or broke: no check can run
        logger.error("math-verify worker pool failed: %r; %d checks return None", e, len(pairs))
        shutdown()
        return results
    stats["calls"] += len(pairs)
    # pebble times each check from when a worker takes it; this outer wait only guards a pool that never starts
    waves = -(-len(pairs) // (_max_workers or max(1, min(2, os.cpu_count() or 1))))
    guard = STARTUP_TIMEOUT_S + waves * (timeout_s + 1.0)
    for i, f in enumerate(futs):
        try:
            results[i] = f.result(timeout=guard)
        except cf.TimeoutError:
            if f.done():  # pebble killed the worker (and started a new one)
                stats["timeouts"] += 1
                stats["pool_restarts"] += 1
                logger.warning("math-verify check timed out after %.1fs (gold=%r, prediction=%.200r); "
                               "its worker was killed", timeout_s, pairs[i][0], pairs[i][1])
            else:  # the pool never ran it: give up on the rest
                logger.error("math-verify workers did not answer in %.0fs; %d checks return None", guard, len(pairs) - i)
                shutdown()
                break
        except Exception as e:  # noqa: BLE001 - the check raised, or its worker died (pebble.ProcessExpired)
            stats["errors"] += 1
            logger.warning("math-verify check failed (gold=%r): %r", pairs[i][0], e)
    return results


def math_equal(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S, boxed_pred: bool = False) -> Optional[bool]:
    """Is ``pred`` mathematically equal to ``gold``?  ``None`` on timeout, error or unparseable gold."""
    return math_equal_many([(gold, pred)], timeout_s, boxed_pred=boxed_pred)[0]
