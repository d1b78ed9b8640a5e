"""Stalled-rank detection: no rank waits forever on another.

Two mechanisms, both bounded by ``trainer.distributed_timeout_s``:

* **Heartbeats** (:class:`Watchdog`): a daemon thread in every rank writes ``beat step stage`` to the process
  group's key-value store (the launcher's TCPStore) every ``timeout / 5`` seconds (at most 5 s) and reads every
  other rank's.  A rank whose value has not changed for ``distributed_timeout_s`` (stopped with SIGSTOP, dead,
  or hung with the GIL held) is named, once, by the first rank to notice::

      distributed error: rank 1 has not reported for 10 s (last seen at step 2, rollout): ...

  and every watching rank exits with code 3 (``os._exit``: its main thread may sit inside a collective).
* **Collective timeout**: the process group is created with ``timeout=distributed_timeout_s`` plus two heartbeat
  intervals (accelerate's ``InitProcessGroupKwargs``), so a collective that a live-but-deadlocked rank never joins
  fails on the others; :func:`collective_error` turns that failure into a ``DistributedError`` naming the ranks
  that are behind.

Times are measured with each rank's own monotonic clock (no clock agreement between machines is needed).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, List, Optional

from .errors import EXIT_DISTRIBUTED, DistributedError, report_once

log = logging.getLogger("rlkit")
PREFIX = "rlkit/heartbeat/"


def heartbeat_interval(timeout_s: float) -> float:
    return max(0.2, min(5.0, float(timeout_s) / 5))


def collective_timeout_s(timeout_s: float) -> float:
    """The process-group timeout: two heartbeats longer than ``distributed_timeout_s``, so a stopped or dead rank
    is named by the watchdog first; the collective timeout catches a rank that is alive but never joins."""
    return float(timeout_s) + 2 * heartbeat_interval(timeout_s)


def default_store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - a backend without a store
        return None


class Watchdog:
    """Heartbeat writer + watcher for one rank (see the module docstring)."""

    def __init__(self, rank: int, world: int, timeout_s: float, store=None, interval_s: Optional[float] = None):
        self.rank, self.world, self.timeout = rank, world, float(timeout_s)
        self.store = store if store is not None else default_store()
        self.interval = interval_s or heartbeat_interval(self.timeout)
        self.step, self.stage = 0, "setup"
        self._stop = threading.Event()
        self._beat = 0
        self._thread: Optional[threading.Thread] = None
        self._seen: Dict[int, str] = {}

    def start(self) -> "Watchdog":
        if self.store is None or self.world < 2:
            return self
        self._publish()
        self._thread = threading.Thread(target=self._run, name="rlkit-watchdog", daemon=True)
        self._thread.start()
        import atexit

        atexit.register(self.stop)  # a rank that ends normally without train() (evaluation, tests) is not a stall
        return self

    def set(self, step: Optional[int] = None, stage: Optional[str] = None) -> None:
        if step is not None:
            self.step = step
        if stage is not None:
            self.stage = stage

    def stop(self, done: bool = True) -> None:
        """Stop watching; ``done`` tells the other ranks this one finished (its silence is then expected)."""
        if self._stop.is_set() and self._thread is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
            self._thread = None
        if done and self.store is not None and self.world > 1:
            try:
                self.store.set(self._key(self.rank), "done")
            except Exception:
                pass

    # ----------------------------------------------------------- internals
    def _key(self, r: int) -> str:
        return f"{PREFIX}{r}"

    def _publish(self) -> None:
        self._beat += 1
        self.store.set(self._key(self.rank), f"{self._beat} {self.step} {self.stage}")

    def peers(self) -> Dict[int, str]:
        """Each other rank's last published ``beat step stage`` (or ``done``); absent ranks left out."""
        out = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            k = self._key(r)
            try:
                if self.store.check([k]):
                    out[r] = self.store.get(k).decode()
            except Exception:
                pass
        return out

    def _run(self) -> None:
        start = time.monotonic()
        changed = {r: start for r in range(self.world) if r != self.rank}
        last_ok = start
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._publish()
                vals = self.peers()
                last_ok = now
            except Exception as e:  # the store itself is unreachable (its host process stopped or died)
                if now - last_ok > self.timeout:
                    self._fail(f"distributed error: the rendezvous store has not answered for {now - last_ok:.0f} s ({e}); "
                               f"stopping (trainer.distributed_timeout_s={self.timeout:g})")
                continue
            for r in list(changed):
                v = vals.get(r)
                if v == "done":
                    changed.pop(r)
                    continue
                if v is not None and v != self._seen.get(r):
                    self._seen[r] = v
                    changed[r] = now
                elif now - changed[r] > self.timeout:
                    self._fail(stall_message(r, now - changed[r], v, self.timeout))

    def _fail(self, line: str) -> None:
        if self._stop.is_set():
            return
        report_once(line)
        os._exit(EXIT_DISTRIBUTED)


def _describe(v: Optional[str]) -> str:
    if not v:
        return "never reported"
    parts = v.split(" ", 2)
    if len(parts) == 3:
        if parts[2] == "setup":
            return "last seen during set-up"
        return f"last seen in step {parts[1]}" + (f" ({parts[2]})" if parts[2] != "step" else "")
    return f"last value {v!r}"


def stall_message(rank: int, silent_s: float, last: Optional[str], timeout: float) -> str:
    return (f"distributed error: rank {rank} has not reported for {silent_s:.0f} s ({_describe(last)}): it is stopped, "
            f"hung or dead; stopping every rank (trainer.distributed_timeout_s={timeout:g})")


def is_collective_timeout(e: BaseException) -> bool:
    msg = str(e).lower()
    name = type(e).__name__
    return name in ("DistBackendError", "DistNetworkError", "DistStoreError") or (
        isinstance(e, RuntimeError) and ("timed out" in msg or "timeout" in msg) and
        any(w in msg for w in ("gloo", "nccl", "collective", "recv", "send", "operation", "store", "connection")))


def collective_error(e: BaseException, watchdog: Optional[Watchdog], timeout: float) -> DistributedError:
    """A failed/timed-out collective as a one-line error naming the ranks that are behind this one."""
    behind: List[str] = []
    if watchdog is not None and watchdog.store is not None:
        mine = watchdog.step
        for r, v in sorted(watchdog.peers().items()):
            parts = v.split(" ", 2)
            if v != "done" and len(parts) == 3 and (int(parts[1]) < mine or parts[2] != watchdog.stage):
                behind.append(f"rank {r} ({_describe(v)})")
    who = ", ".join(behind) if behind else "another rank"
    first = " ".join(str(e).split())[:200]
    return DistributedError(f"a collective did not complete within trainer.distributed_timeout_s={timeout:g}: waiting for "
                            f"{who}; {type(e).__name__}: {first}")
