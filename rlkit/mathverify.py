"""math-verify in worker processes, with a timeout the caller controls.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's
main thread, and a pathological expression can keep sympy busy for minutes.  So
every check runs in a spawn-context :class:`~concurrent.futures.ProcessPoolExecutor`
(created lazily, ``min(2, cpu_count)`` workers by default).  When a check exceeds
its timeout, the pool's workers are killed and a fresh pool is created, so a stuck
worker never hangs the caller; the check returns ``None``.

    math_equal("\\\\frac{1}{2}", "0.5")             # True
    math_equal_many([("2", "\\\\boxed{3}")])         # [False]

The gold answer is wrapped as ``\\boxed{gold}`` and parsed with LaTeX extraction;
the prediction is parsed with LaTeX + expression extraction (as verl and TRL do).

Workers are cheap: they import only this module and math-verify (not torch, not the
caller's ``__main__``, so an unguarded training script is not re-run in them), and
they are started before the first check so start-up never counts against a timeout.
The pool is shut down at exit (``shutdown()``); ``configure(max_workers=...)`` resizes it.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 120.0  # spawning a worker and importing sympy is not charged to a check's timeout

_lock = threading.RLock()
_pool: Optional[cf.ProcessPoolExecutor] = None
_max_workers: Optional[int] = None
stats: Dict[str, int] = {"calls": 0, "timeouts": 0, "errors": 0, "pool_restarts": 0}


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


def _noop() -> int:
    return os.getpid()


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


def _new_pool() -> cf.ProcessPoolExecutor:
    n = _max_workers or max(1, min(2, os.cpu_count() or 1))
    boot = _WORKER_BOOT.format(pkg_dir=os.path.dirname(os.path.abspath(__file__)))
    pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=exec, initargs=(boot, {}))
    # start every worker now, so process start-up is not charged to the first check's timeout
    try:
        warm = [_submit(pool, _noop) for _ in range(n)]
        for f in warm:
            f.result(timeout=STARTUP_TIMEOUT_S)
    except Exception as e:
        _kill(pool)
        raise RuntimeError(f"math-verify worker processes failed to start: {e!r}") from e
    return pool


def _submit(pool: cf.ProcessPoolExecutor, fn, *args) -> cf.Future:
    # submit() is where the executor starts worker processes: keep __main__ out of them
    with _lock, _main_hidden():
        return pool.submit(fn, *args)


def _get_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = _new_pool()
        return _pool


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            p.kill()
        except Exception:  # pragma: no cover - already gone
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def _restart(pool: cf.ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
        stats["pool_restarts"] += 1
    _kill(pool)


def shutdown() -> None:
    """Stop the worker processes (called at exit; the next check starts a new pool)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        _kill(pool)


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
    inner = max(1, int(timeout_s))
    pending = list(range(len(pairs)))
    broken = 0  # consecutive pool failures without progress
    while pending:
        if broken >= 3:
            logger.error("math-verify worker pool keeps failing; %d checks return None", len(pending))
            break
        try:
            pool = _get_pool()
        except RuntimeError as e:
            logger.error("%s", e)
            break
        try:
            futs = {i: _submit(pool, check, pairs[i][0], pairs[i][1], inner) for i in pending}
        except Exception:  # the pool broke between checks (a worker died): start over
            _restart(pool)
            broken += 1
            continue
        broken = 0
        stats["calls"] += len(pending)
        rest: List[int] = []
        for k, i in enumerate(pending):
            try:
                results[i] = futs[i].result(timeout=timeout_s)
                continue
            except cf.TimeoutError:
                stats["timeouts"] += 1
                logger.warning("math-verify check timed out after %.1fs (gold=%r, prediction=%.200r); "
                               "restarting the worker pool", timeout_s, pairs[i][0], pairs[i][1])
            except Exception as e:  # a worker crashed, or the check raised
                stats["errors"] += 1
                logger.warning("math-verify check failed (gold=%r): %r", pairs[i][0], e)
                if not isinstance(e, cf.process.BrokenProcessPool):
                    continue
            # the pool is stuck or broken: keep finished results, redo the others in a fresh pool
            _restart(pool)
            for j in pending[k + 1:]:
                f = futs[j]
                if f.done() and not f.cancelled() and f.exception() is None:
                    results[j] = f.result()
                else:
                    rest.append(j)
            break
        pending = rest
    return results


def math_equal(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S, boxed_pred: bool = False) -> Optional[bool]:
    """Is ``pred`` mathematically equal to ``gold``?  ``None`` on timeout, error or unparseable gold."""
    return math_equal_many([(gold, pred)], timeout_s, boxed_pred=boxed_pred)[0]
