"""Rollout workers and weight transfer (``rollout.max_staleness >= 1``, docs/async.md).

A rollout worker is a separate process that owns a :class:`~rlkit.rollout.stage.RolloutStage` (engine, strategy,
rewards, pre-advantage filters), built from the config alone.  The trainer side, :class:`RolloutWorkers`, talks
to its workers over two channels:

* **control**: :mod:`multiprocessing.connection` (``Listener`` / ``Client``, HMAC-authenticated with
  ``RLKIT_WORKER_AUTHKEY`` or a key derived from the config) carries requests, results, state and errors as
  pickled messages.  A worker handles its messages strictly in order (weights, requests, state, close), so a
  request always sees every weight version pushed before it.
* **weights**: the tensors of a dtype are flattened into one byte buffer per push, and travel by the fastest
  transport that fits (no disk round trip): local CPU workers read a shared-memory buffer the flatten writes into
  (``shm``); a worker on the trainer's GPU gets CUDA IPC handles (``cuda_ipc``; both use ``torch.multiprocessing``'s
  reductions over the control connection); otherwise a dedicated *stateless* ``torch.distributed`` group (a
  ``TCPStore`` served by the trainer plus ``ProcessGroupGloo``, or ``ProcessGroupNCCL`` when the weights live on a
  GPU and the worker is on another GPU) broadcasts the buffers; it never touches accelerate's default group.
  Everything else on the control connection is a plain pickle (tensors by value), readable on another machine.

A worker's reader thread receives pushed weights as soon as they are broadcast (so a push never waits for a
generation in progress); its main thread applies them in message order.  A heartbeat thread lets the trainer tell
a busy worker from a dead or hung one: a worker silent for ``trainer.distributed_timeout_s`` is an error.

Local mode (``rollout.worker_addresses`` empty): ``rollout.num_workers`` spawned processes per trainer rank on
127.0.0.1, killed with the trainer (``PR_SET_PDEATHSIG`` and a closed control connection).  Remote mode: the user
starts ``python -m rlkit rollout-worker recipe=R.yaml [overrides] --listen HOST:PORT`` with the trainer's recipe and
overrides; the trainer checks the two configs agree (naming the keys that differ) before anything is loaded.
"""
from __future__ import annotations

import collections
import ctypes
import datetime
import hashlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing  # noqa: F401  (CUDA tensors pickle as IPC handles over a Connection)

from ..errors import UserError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0            # a worker says it is alive this often, even while generating
POLL_S = 0.2                 # how often a waiting trainer checks that its workers are alive
CLOSE_GRACE_S = 10.0         # close(): how long a worker may take to exit before it is killed
# keys that may differ between the trainer's and a remote worker's config (they do not change what a worker does)
FINGERPRINT_IGNORE = ("recipe", "rollout.worker_addresses", "trainer.output_dir", "trainer.run_name", "trainer.resume",
                      "trainer.log_with", "trainer.progress_bar", "trainer.tracker_project", "trainer.wandb_mode",
                      "trainer.save_every", "trainer.keep_checkpoints", "trainer.save_final", "trainer.log_completions",
                      "trainer.metric_names", "trainer.distributed_timeout_s", "rollout.worker_threads")


class RolloutWorkerError(UserError, RuntimeError):
    """A rollout worker cannot be reached, died, hung, has another config, or failed (its message, forwarded)."""

    kind = "rollout worker"

    def __init__(self, message: str, kind: Optional[str] = None):
        super().__init__(message)
        if kind:
            self.kind = kind


# ------------------------------------------------------------------ helpers shared by both sides
def tensor_checksum(tensors: Iterable[torch.Tensor]) -> float:
    """Float64 sum of every element: a cheap fingerprint of a set of weights (compare for exact equality)."""
    total = 0.0
    for t in tensors:
        total += float(t.detach().double().sum())
    return total


def flatten_by_dtype(named: Sequence[Tuple[str, torch.Tensor]], buffers: Optional[Callable[[torch.dtype, int], torch.Tensor]] = None):
    """``[(dtype, byte buffer, [(name, shape, numel), ...]), ...]``: one contiguous byte buffer per dtype, in first-seen
    dtype order and the given tensor order within a dtype.  ``buffers(dtype, nbytes)`` supplies the byte buffers to
    write into (shared memory); default: new tensors."""
    groups: Dict[torch.dtype, List[Tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        groups.setdefault(t.dtype, []).append((name, t))
    out = []
    for dtype, items in groups.items():
        parts = [t.detach().reshape(-1) for _, t in items]
        numel = sum(p.numel() for p in parts)
        if buffers is None:
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        else:
            flat = buffers(dtype, numel * parts[0].element_size()).view(dtype)
            torch.cat(parts, out=flat)
        out.append((dtype, flat.view(torch.uint8), [(n, tuple(t.shape), t.numel()) for n, t in items]))
    return out


def unflatten(dtype: torch.dtype, buf: torch.Tensor, layout) -> List[Tuple[str, torch.Tensor]]:
    """The inverse of one group of :func:`flatten_by_dtype` (views into ``buf``)."""
    flat = buf.view(dtype)
    out, off = [], 0
    for name, shape, numel in layout:
        out.append((name, flat[off:off + numel].view(shape)))
        off += numel
    return out


def config_fingerprint(cfg) -> Dict[str, Any]:
    """The config as dotted key -> value (minus :data:`FINGERPRINT_IGNORE`): compared on connect."""
    import dataclasses

    from ..config import PluginSpec, to_dict

    flat: Dict[str, Any] = {}

    def walk(prefix, obj):
        for f in dataclasses.fields(obj):
            v, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(v) and not isinstance(v, PluginSpec):
                walk(key + ".", v)
            else:
                flat[key] = to_dict(v)

    walk("", cfg)
    return {k: v for k, v in flat.items() if k not in FINGERPRINT_IGNORE}


def fingerprint_diff(mine: Dict[str, Any], theirs: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k, "<unset>") != theirs.get(k, "<unset>"))


def default_authkey(cfg) -> bytes:
    """``RLKIT_WORKER_AUTHKEY`` if set, else a key derived from model.name_or_path and trainer.seed (set the variable
    on both machines for anything but a trusted network)."""
    env = os.environ.get("RLKIT_WORKER_AUTHKEY")
    if env:
        return env.encode()
    return hashlib.sha256(f"rlkit-rollout:{cfg.model.name_or_path}:{cfg.trainer.seed}".encode()).digest()


def parse_address(addr: str, key: str = "rollout.worker_addresses") -> Tuple[str, int]:
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RolloutWorkerError(f"{key}: {addr!r} is not host:port (e.g. 10.0.0.2:29600)", kind="config")
    return host.strip("[]"), int(port)


def thread_split(num_workers: int, world: int = 1, cores: Optional[int] = None) -> Tuple[int, int]:
    """(trainer threads, threads per local worker): half the cores to the trainer ranks of this machine, half to their
    workers (2 cores, one rank, one worker: 1 + 1)."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
    world = max(1, world)
    return max(1, cores // (2 * world)), max(1, cores // (2 * world * max(1, num_workers)))


def _local_ip(conn: Connection) -> str:
    """The address of this end of a connected control socket (the interface that faces the peer)."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return s.getsockname()[0]
    finally:
        s.close()


def _connect(h, host: str, port: int, authkey: bytes, timeout_s: float) -> Connection:
    """``multiprocessing.connection.Client`` with a connect/handshake timeout; a refused connection is retried for
    ``timeout_s`` (the worker may still be starting)."""
    from multiprocessing.connection import answer_challenge, deliver_challenge

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            break
        except OSError as e:
            if time.monotonic() > deadline or not isinstance(e, ConnectionRefusedError):
                raise RolloutWorkerError(f"{h.name} cannot be reached: {e.strerror or e} (start it with "
                                         f"`python -m rlkit rollout-worker recipe=... --listen {h.address}`)") from None
            time.sleep(0.5)
    try:
        sock.settimeout(None)
        # a receive timeout in the kernel (the fd stays blocking, as Connection needs): the handshake cannot hang on
        # something that is not a worker
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(timeout_s), 0))
        conn = Connection(os.dup(sock.fileno()))
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        sock.close()
        return conn
    except Exception as e:  # noqa: BLE001 - AuthenticationError, a reset or a timeout: not our worker or another key
        raise RolloutWorkerError(f"{h.name}: the authentication handshake failed ({type(e).__name__}: {e}); set the same "
                                 f"RLKIT_WORKER_AUTHKEY on both sides (the default key is derived from "
                                 f"model.name_or_path and trainer.seed)") from None


def _dumps(msg) -> bytes:
    """Control messages are plain pickles: tensors travel by value, so a worker on another machine (or one that is
    not this process's child) can read them.  Only ``weights_ipc`` (shared memory / CUDA IPC, local workers) uses
    torch.multiprocessing's reductions, which send handles instead of bytes."""
    if msg[0] == "weights_ipc":
        from multiprocessing.reduction import ForkingPickler

        return bytes(ForkingPickler.dumps(msg))
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def _loads(data: bytes):
    return pickle.loads(data)


def _make_group(backend: str, store, rank: int, size: int, timeout_s: float, ip: str):
    td = datetime.timedelta(seconds=timeout_s)
    import torch.distributed as dist

    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = td
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=ip)]
    return dist.ProcessGroupGloo(store, rank, size, opts)


def _broadcast(pg, buf: torch.Tensor) -> None:
    pg.broadcast(buf, 0).wait()


def _describe_error(e: BaseException) -> Tuple[str, str]:
    """(kind, message without the ``kind error:`` prefix) of an exception raised in a worker."""
    from ..errors import _known_user_errors, kind_of

    if isinstance(e, _known_user_errors()):
        kind = kind_of(e)
        msg = " ".join(str(e).split()) or type(e).__name__
        prefix = f"{kind} error: "
        return kind, msg[len(prefix):] if msg.startswith(prefix) else msg
    return "rollout worker", f"{type(e).__name__}: {' '.join(str(e).split())} (traceback on the worker's stderr)"


# ------------------------------------------------------------------ worker side
def _default_stage_factory(cfg, rank, world, device):
    from .stage import RolloutStage

    return RolloutStage.from_config(cfg, rank, world, device)


class WeightSink:
    """A stage that only holds weights (``param_specs`` given): for the transfer benchmark and transport checks.
    ``run`` returns the version it holds and its checksum.  Use ``functools.partial(WeightSink, specs)`` as the
    ``stage_factory``."""

    def __init__(self, specs, cfg=None, rank=0, world=1, device=None):
        self.device = torch.device(device or "cpu")
        self.params = {n: torch.zeros(tuple(s), dtype=d, device=self.device) for n, s, d in specs}
        self.version = -1

    def param_specs(self):
        return [(n, t.shape, t.dtype) for n, t in self.params.items()]

    def load_weights(self, named, version):
        for n, t in named:
            self.params[n].copy_(t)
        self.version = version

    def weight_checksum(self):
        return float(self.version)  # the benchmark checks the bytes with run(); loading must not pay for a checksum

    def run(self, req):
        from .stage import weight_checksum

        return {"version": self.version, "checksum": weight_checksum(self.params.items())}

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def _resolve_device(spec: str, trainer_device: str) -> torch.device:
    if spec and spec != "auto":
        return torch.device(spec)
    if trainer_device.startswith("cuda") and torch.cuda.is_available():
        return torch.device(trainer_device if os.environ.get("RLKIT_WORKER_LOCAL") else f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    return torch.device("cpu")


def worker_main(cfg, listen: str, rank: Optional[int] = None, world: Optional[int] = None,
                stage_factory: Optional[Callable] = None, authkey: Optional[bytes] = None,
                listener: Optional[Listener] = None) -> None:
    """Serve one trainer: accept its connection on ``listen`` ("host:port"), check its config, build the stage with
    ``stage_factory(cfg, rank, world, device)`` (default ``RolloutStage.from_config``) and process its messages in
    order until ``close`` (or until the trainer disappears).  ``rank``/``world`` default to the trainer's."""
    factory = stage_factory or _default_stage_factory
    if listener is None:
        host, port = parse_address(listen, "--listen")
        try:
            listener = Listener((host, port), authkey=authkey or default_authkey(cfg))
        except OSError as e:
            raise RolloutWorkerError(f"cannot listen on {listen}: {e.strerror or e}") from None
        logger.info("rollout worker listening on %s", listen)
    try:
        while True:
            try:
                conn = listener.accept()
                break
            except (OSError, EOFError, multiprocessing.AuthenticationError) as e:  # a probe, a port scanner or a trainer with another key: keep waiting
                logger.warning("rollout worker: rejected a connection (%s: %s)", type(e).__name__, e)
    finally:
        listener.close()
    global _CURRENT
    _CURRENT = _Worker(cfg, conn, rank, world, factory)
    _CURRENT.serve()


class _Worker:
    def __init__(self, cfg, conn: Connection, rank, world, factory):
        self.cfg, self.conn, self.rank, self.world, self.factory = cfg, conn, rank, world, factory
        self.send_lock = threading.Lock()
        self.inbox: "queue.Queue" = queue.Queue()
        self.pg = None
        self.store = None
        self.alive = True

    def send(self, msg) -> None:
        data = _dumps(msg)
        with self.send_lock:
            self.conn.send_bytes(data)

    def _heartbeat(self) -> None:
        while self.alive:
            time.sleep(HEARTBEAT_S)
            try:
                self.send(("alive",))
            except (OSError, EOFError, ValueError):
                _leave(0, self)  # the trainer is gone: nothing to work for

    def serve(self) -> None:
        hello = _loads(self.conn.recv_bytes())
        if hello[0] != "hello":
            raise RuntimeError(f"rollout worker: expected hello, got {hello[0]!r}")
        info = hello[1]
        diff = fingerprint_diff(config_fingerprint(self.cfg), info["fingerprint"])
        if diff:
            mine, theirs = config_fingerprint(self.cfg), info["fingerprint"]
            shown = ", ".join(f"{k} (trainer {theirs.get(k, '<unset>')!r}, worker {mine.get(k, '<unset>')!r})" for k in diff[:6])
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            self.send(("error", "config", f"the worker was started with another config: {shown}{more}; start it with "
                                          f"the trainer's recipe and overrides"))
            return
        rank = info["rank"] if self.rank is None else self.rank
        world = info["world"] if self.world is None else self.world
        self.send(("hello_ok", os.getpid()))
        threading.Thread(target=self._heartbeat, daemon=True, name="rlkit-worker-heartbeat").start()
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=info["timeout_s"])
        self.backend = info["backend"]
        if self.backend not in ("cuda_ipc", "shm"):
            self.store = dist.TCPStore(info["store_host"], info["store_port"], info["group_size"], False, timeout=timeout)
            self.pg = _make_group(self.backend, self.store, info["group_rank"], info["group_size"], info["timeout_s"],
                                  _local_ip(self.conn))
        self.device = _resolve_device(info["worker_device"], info["trainer_device"])
        try:
            self.stage = self.factory(self.cfg, rank, world, self.device)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the trainer as one line
            self._report(e)
            return
        self.send(("ready", {"pid": os.getpid(), "device": str(self.device)}))
        threading.Thread(target=self._reader, daemon=True, name="rlkit-worker-reader").start()
        self._loop()
        _leave(0, self)  # the trainer closed

    def _reader(self) -> None:
        """Receive every message at once (weights are broadcast into fresh buffers right away) and queue it."""
        try:
            while True:
                msg = _loads(self.conn.recv_bytes())
                if msg[0] == "weights":
                    _, version, groups = msg
                    bufs = []
                    for dtype, nbytes, layout in groups:
                        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device if self.backend == "nccl" else "cpu")
                        _broadcast(self.pg, buf)
                        bufs.append((dtype, buf, layout))
                    self.inbox.put(("weights", version, bufs))
                elif msg[0] == "weights_ipc":
                    _, version, groups = msg
                    bufs = [(dtype, buf.clone(), layout) for dtype, buf, layout in groups]
                    if bufs and bufs[0][1].is_cuda:
                        torch.cuda.synchronize(bufs[0][1].device)
                    del groups, msg
                    self.send(("ipc_ack", version))
                    self.inbox.put(("weights", version, bufs))
                else:
                    self.inbox.put(msg)
                    if msg[0] == "close":
                        return
        except (EOFError, OSError):
            _leave(0, self)  # the trainer closed the connection or died: leave at once
        except Exception as e:  # noqa: BLE001 - a failed broadcast: tell the trainer, then stop
            traceback.print_exc()
            try:
                self._report(e)
            finally:
                _leave(1, self)

    def _report(self, e: BaseException) -> None:
        kind, msg = _describe_error(e)
        if kind == "rollout worker":
            traceback.print_exc()
        self.send(("error", kind, msg))

    def _loop(self) -> None:
        while True:
            msg = self.inbox.get()
            op = msg[0]
            try:
                if op == "weights":
                    t0 = time.perf_counter()
                    _, version, bufs = msg
                    named = []
                    for dtype, buf, layout in bufs:
                        named += [(n, t.to(self.device)) for n, t in unflatten(dtype, buf, layout)]
                    self.stage.load_weights(named, version)
                    del named, bufs
                    self.send(("loaded", version, float(self.stage.weight_checksum()), time.perf_counter() - t0))
                elif op == "request":
                    self.send(("result", msg[1], self.stage.run(msg[1])))
                elif op == "state":
                    self.send(("state", self.stage.state_dict()))
                elif op == "load_state":
                    self.stage.load_state_dict(msg[1])
                elif op == "close":
                    self.alive = False
                    self.send(("closed",))
                    return
            except Exception as e:  # noqa: BLE001 - forwarded to the trainer as one line; the worker stays up
                self._report(e)


_CURRENT: Optional["_Worker"] = None


def _leave(code: int, worker: Optional["_Worker"] = None) -> None:
    """Exit the worker process now: stop the processes the stage started (reward / math-verify pools, the stage's own
    ``close()``), bounded to a few seconds, then ``os._exit`` without interpreter teardown (destroying a live gloo
    group from Python's finalizer aborts with "terminate called without an active exception")."""
    worker = worker or _CURRENT

    def stop():
        stage = getattr(worker, "stage", None)
        if stage is not None and callable(getattr(stage, "close", None)):
            try:
                stage.close()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        for mod in ("rlkit.reward_pool", "rlkit.mathverify"):
            m = sys.modules.get(mod)
            if m is not None:
                try:
                    m.shutdown()
                except Exception:  # noqa: BLE001
                    pass

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    t.join(5.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream
            pass
    logging.shutdown()
    os._exit(code)


def _on_sigterm(signum, frame) -> None:  # terminate(), the parent's exit (daemonic child), PR_SET_PDEATHSIG
    _leave(0)


def _set_pdeathsig() -> None:
    """Linux: this process gets SIGTERM when its parent dies (a trainer killed with SIGKILL leaves no worker); the
    handler stops the stage's own child processes before leaving."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _local_entry(cfg, authkey: bytes, addr_conn, stage_factory, threads: int, parent_pid: int) -> None:
    """Entry of a spawned local worker: listen on a free port of 127.0.0.1, tell the parent the port, serve it."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _set_pdeathsig()
    if os.getppid() != parent_pid:
        os._exit(0)
    # the parent treats this process as daemonic (terminated at its exit); the stage may start its own processes
    # (reward isolation, math-verify), which a daemonic process may not
    multiprocessing.current_process()._config["daemon"] = False
    os.environ["RLKIT_WORKER_LOCAL"] = "1"
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rollout-worker: %(message)s")
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    addr_conn.send(listener.address[1])
    addr_conn.close()
    try:
        worker_main(cfg, "127.0.0.1:%d" % listener.address[1], stage_factory=stage_factory, listener=listener)
    except UserError as e:
        from ..errors import one_line

        sys.stderr.write(one_line(e) + "\n")
        os._exit(2)


# ------------------------------------------------------------------ trainer side
class _Handle:
    def __init__(self, index: int, address: str, conn: Connection, proc=None):
        self.index, self.address, self.conn, self.proc = index, address, conn, proc
        self.results: "collections.deque" = collections.deque()
        self.replies: "collections.deque" = collections.deque()
        self.checksums: Dict[int, float] = {}
        self.acks: set = set()
        self.last_heard = time.monotonic()
        self.closed = False

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.address})"


class RolloutWorkers:
    """Trainer side of the rollout workers of one trainer rank (module docstring; docs/async.md).

    ``submit`` deals requests to workers round-robin by step (worker ``(step - 1) % n``); ``receive`` returns results
    in submission order; ``push_weights`` sends a weight version to every worker and returns the seconds it took."""

    def __init__(self, cfg, rank: int = 0, world: int = 1,
                 param_specs: Optional[List[Tuple[str, torch.Size, torch.dtype]]] = None,
                 stage_factory: Optional[Callable] = None, trainer_device: Optional[str] = None,
                 transport: Optional[str] = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self._shm: Dict[torch.dtype, torch.Tensor] = {}
        self._shm_version: Optional[int] = None
        self._pushes = 0
        self.param_specs = list(param_specs) if param_specs is not None else None
        self.timeout_s = float(cfg.trainer.distributed_timeout_s)
        self.handles: List[_Handle] = []
        self.pending: "collections.deque" = collections.deque()   # (worker index, step, round) in submission order
        self.store = self.pg = None
        self._closed = False
        self._old_threads: Optional[int] = None
        self.last_push: Dict[str, float] = {}
        r = cfg.rollout
        addresses = list(getattr(r, "worker_addresses", None) or [])
        device = trainer_device or ("cuda:%d" % torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        self.trainer_device = device
        worker_device = str(getattr(r, "worker_device", "auto") or "auto")
        try:
            if addresses:
                if len(addresses) % max(1, world):
                    raise RolloutWorkerError(f"rollout.worker_addresses: {len(addresses)} addresses for {world} trainer "
                                             f"ranks (give each rank the same number)", kind="config")
                per = len(addresses) // max(1, world)
                mine = addresses[rank * per:(rank + 1) * per]
                for a in mine:
                    parse_address(a)
                self._connect_remote(mine)
                local = False
            else:
                self._spawn_local(int(getattr(r, "num_workers", 1) or 1), stage_factory)
                local = True
            same_gpu = local and device.startswith("cuda") and worker_device in ("auto", device)
            if transport is not None:    # the benchmark compares transports
                self.backend = transport
            elif same_gpu:
                self.backend = "cuda_ipc"
            elif device.startswith("cuda") and not worker_device.startswith("cpu"):
                self.backend = "nccl"
            elif local and not device.startswith("cuda"):
                self.backend = "shm"      # measured faster than gloo on one machine (docs/benchmarks.md)
            else:
                self.backend = "gloo"
            self._handshake(worker_device)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- setup
    def _spawn_local(self, n: int, stage_factory) -> None:
        import torch.multiprocessing as tmp

        from ..mathverify import _lock, _main_hidden

        ctx = tmp.get_context("spawn")
        trainer_threads, worker_threads = thread_split(n, self.world)
        worker_threads = int(getattr(self.cfg.rollout, "worker_threads", 0) or worker_threads)
        if torch.get_num_threads() > trainer_threads:
            self._old_threads = torch.get_num_threads()
            torch.set_num_threads(trainer_threads)
        logger.info("rollout workers: %d local worker(s), %d thread(s) each; trainer %d thread(s)", n, worker_threads,
                    torch.get_num_threads())
        authkey = os.urandom(32)
        for i in range(n):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_local_entry, args=(self.cfg, authkey, child_end, stage_factory, worker_threads,
                                                          os.getpid()), daemon=True, name=f"rlkit-rollout-worker-{i}")
            with _lock, _main_hidden():
                proc.start()
            child_end.close()
            h = _Handle(i, "127.0.0.1:?", None, proc)  # type: ignore[arg-type]
            self.handles.append(h)
            deadline = time.monotonic() + self.timeout_s
            while not parent_end.poll(POLL_S):
                if not proc.is_alive():
                    raise RolloutWorkerError(f"{h.name} {self._death(h)} while starting")
                if time.monotonic() > deadline:
                    raise RolloutWorkerError(f"{h.name} did not start within {self.timeout_s:g} s "
                                             f"(trainer.distributed_timeout_s)")
            port = parent_end.recv()
            parent_end.close()
            h.address = f"127.0.0.1:{port}"
            h.conn = Client(("127.0.0.1", port), authkey=authkey)

    def _connect_remote(self, addresses: List[str]) -> None:
        authkey = default_authkey(self.cfg)
        for i, a in enumerate(addresses):
            host, port = parse_address(a)
            h = _Handle(i, a, None)  # type: ignore[arg-type]
            self.handles.append(h)
            h.conn = _connect(h, host, port, authkey, min(self.timeout_s, 10.0))

    def _handshake(self, worker_device: str) -> None:
        import torch.distributed as dist

        n = len(self.handles)
        fp = config_fingerprint(self.cfg)
        if self.backend not in ("cuda_ipc", "shm"):
            self.store = dist.TCPStore("0.0.0.0", 0, n + 1, True, timeout=datetime.timedelta(seconds=self.timeout_s),
                                       wait_for_workers=False)
        for j, h in enumerate(self.handles):
            info = {"fingerprint": fp, "rank": self.rank, "world": self.world, "timeout_s": self.timeout_s,
                    "backend": self.backend, "group_rank": j + 1, "group_size": n + 1,
                    "store_host": _local_ip(h.conn), "store_port": self.store.port if self.store is not None else 0,
                    "worker_device": worker_device, "trainer_device": self.trainer_device}
            self._send(h, ("hello", info))
        for h in self.handles:
            self._pump(h, lambda: bool(h.replies), "answer the trainer's hello")
            h.replies.popleft()
        if self.backend not in ("cuda_ipc", "shm"):
            self.pg = _make_group(self.backend, self.store, 0, n + 1, self.timeout_s, _local_ip(self.handles[0].conn))
        for h in self.handles:
            self._pump(h, lambda: bool(h.replies), "build its rollout stage")
            h.replies.popleft()

    # -------------------------------------------------------------- message pump
    def _death(self, h: _Handle) -> str:
        if h.proc is not None:
            h.proc.join(timeout=2.0)
            code = h.proc.exitcode
            if code is None:
                return "closed its connection"
            return f"died (signal {-code})" if code < 0 else f"exited with code {code}"
        return "closed the connection (it died or was stopped)"

    def _send(self, h: _Handle, msg) -> None:
        if h.proc is not None and h.proc.exitcode is not None:  # a send to a dead peer may still "succeed" (buffered)
            raise RolloutWorkerError(f"{h.name} {self._death(h)}")
        try:
            h.conn.send_bytes(_dumps(msg))
        except (OSError, EOFError) as e:
            raise RolloutWorkerError(f"{h.name} {self._death(h)} ({type(e).__name__} sending to it)") from None

    def _pump(self, h: _Handle, done: Callable[[], bool], what: str) -> None:
        """Read ``h``'s messages until ``done()``; a dead, silent or failing worker raises a one-line error."""
        h.last_heard = time.monotonic()
        while not done():
            try:
                ready = h.conn.poll(POLL_S)
            except (OSError, EOFError, ValueError):
                ready = True
            if time.monotonic() - h.last_heard > self.timeout_s:  # checked on every pass: never a hang
                raise RolloutWorkerError(f"{h.name} has been silent for {self.timeout_s:g} s while it should "
                                         f"{what} (hung or unreachable; trainer.distributed_timeout_s)")
            if not ready:
                if h.proc is not None and h.proc.exitcode is not None:
                    raise RolloutWorkerError(f"{h.name} {self._death(h)} while it should {what}")
                continue
            try:
                msg = _loads(h.conn.recv_bytes())
            except (OSError, EOFError):
                raise RolloutWorkerError(f"{h.name} {self._death(h)} while it should {what}") from None
            h.last_heard = time.monotonic()
            op = msg[0]
            if op == "alive":
                continue
            if op == "result":
                h.results.append(msg[2])
            elif op == "loaded":
                h.checksums[msg[1]] = msg[2]
                self.last_push[f"load_s/worker{h.index}"] = msg[3]
            elif op == "ipc_ack":
                h.acks.add(msg[1])
            elif op == "error":
                raise RolloutWorkerError(f"{h.name}: {msg[2]}", kind=msg[1])
            else:  # hello_ok, ready, state, closed
                h.replies.append(msg)

    # -------------------------------------------------------------- API
    def submit(self, req) -> None:
        """Queue ``req`` on worker ``(req.step - 1) % n`` (refill rounds of a step go to the same worker)."""
        i = (int(req.step) - 1) % len(self.handles)
        self._send(self.handles[i], ("request", req))
        self.pending.append((i, req.step, getattr(req, "round", 0)))

    def receive(self):
        """The result of the oldest submitted request (blocking; never longer than a worker's silence allows)."""
        if not self.pending:
            raise RuntimeError("RolloutWorkers.receive() without a submitted request")
        i, step, rnd = self.pending[0]
        h = self.handles[i]
        self._pump(h, lambda: bool(h.results), f"generate step {step} round {rnd}")
        self.pending.popleft()
        return h.results.popleft()

    def push_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int) -> float:
        """Send weight ``version`` to every worker (one broadcast per dtype); returns the seconds it took.  Every
        request submitted afterwards is generated with these weights."""
        t0 = time.perf_counter()
        named = [(n, t) for n, t in named_tensors]
        if self.param_specs is not None:
            got = {n: (tuple(t.shape), t.dtype) for n, t in named}
            want = {n: (tuple(s), d) for n, s, d in self.param_specs}
            if got != want:
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
                raise RuntimeError(f"push_weights: the tensors do not match the stage's param_specs (missing {missing[:3]}, "
                                   f"unexpected {extra[:3]}, other shape/dtype {bad[:3]})")
        if self.backend == "shm":  # one shared buffer per dtype, rewritten once the workers copied the last push
            if self._shm_version is not None:
                for h in self.handles:
                    self._pump(h, lambda: self._shm_version in h.acks, f"copy weights v{self._shm_version}")
                    h.acks.discard(self._shm_version)
            with torch.no_grad():
                groups = flatten_by_dtype(named, self._shm_buffer)
            for h in self.handles:
                self._send(h, ("weights_ipc", version, groups))
            self._shm_version = version
        else:
            with torch.no_grad():
                groups = flatten_by_dtype(named)
        nbytes = sum(b.numel() for _, b, _ in groups)
        if self.backend == "shm":
            pass
        elif self.backend == "cuda_ipc":
            for h in self.handles:
                self._send(h, ("weights_ipc", version, groups))
            for h in self.handles:
                self._pump(h, lambda: version in h.acks, f"copy weights v{version}")
                h.acks.discard(version)
        else:
            if self.backend == "gloo":
                groups = [(d, b.cpu(), lay) for d, b, lay in groups]
            meta = [(d, b.numel(), lay) for d, b, lay in groups]
            for h in self.handles:
                self._send(h, ("weights", version, meta))
            try:
                for _, buf, _ in groups:
                    _broadcast(self.pg, buf)
            except Exception as e:  # noqa: BLE001 - a worker died or hung during the broadcast: name it
                for h in self.handles:
                    if h.proc is not None and h.proc.exitcode is not None:
                        raise RolloutWorkerError(f"{h.name} {self._death(h)} while receiving weights v{version}") from None
                raise RolloutWorkerError(f"weight broadcast of v{version} failed: {' '.join(str(e).split())[:200]}") from None
        dt = time.perf_counter() - t0
        self.last_push.update({"seconds": dt, "bytes": float(nbytes), "version": float(version)})
        logger.log(logging.INFO if self._pushes == 0 else logging.DEBUG,  # later pushes: the time/weight_transfer metric
                   "rollout workers: weights v%d (%.1f MB, %d dtype buffer(s), %s) pushed in %.3f s", version,
                   nbytes / 1e6, len(groups), self.backend, dt)
        self._pushes += 1
        return dt

    def _shm_buffer(self, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        buf = self._shm.get(dtype)
        if buf is None or buf.numel() != nbytes:
            buf = self._shm[dtype] = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        return buf

    def checksum(self, version: int) -> float:
        """The first worker's ``weight_checksum()`` right after it loaded ``version`` (waits for it; results that
        arrive meanwhile are kept for ``receive``).  Every worker's must agree, else a WeightSyncError-like error."""
        vals = []
        for h in self.handles:
            self._pump(h, lambda: version in h.checksums, f"load weights v{version}")
            vals.append(h.checksums[version])
        if any(v != vals[0] for v in vals):
            raise RolloutWorkerError(f"workers hold different weights after v{version}: checksums {vals}", kind="weight sync")
        for h in self.handles:  # keep the dicts small
            for v in [v for v in h.checksums if v < version]:
                del h.checksums[v]
        return vals[0]

    def state_dict(self) -> Dict[str, Any]:
        """Every worker's stage state (waits for the requests already submitted to finish first)."""
        out = []
        for h in self.handles:
            self._send(h, ("state",))
            self._pump(h, lambda: bool(h.replies), "report its state")
            out.append(h.replies.popleft()[1])
        return {"workers": out}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        states = sd.get("workers", [])
        if len(states) != len(self.handles):
            raise RolloutWorkerError(f"the checkpoint holds the state of {len(states)} rollout workers, this run has "
                                     f"{len(self.handles)}", kind="checkpoint")
        for h, s in zip(self.handles, states):
            self._send(h, ("load_state", s))

    def close(self) -> None:
        """Stop every worker (idempotent); a worker that does not exit within a few seconds is killed."""
        if self._closed:
            return
        self._closed = True
        for h in self.handles:
            if h.conn is not None:
                try:
                    h.conn.send_bytes(_dumps(("close",)))
                except (OSError, EOFError, ValueError):
                    pass
        deadline = time.monotonic() + CLOSE_GRACE_S
        for h in self.handles:
            if h.proc is not None:
                h.proc.join(timeout=max(0.1, deadline - time.monotonic()))
                if h.proc.is_alive():  # SIGTERM first: the worker stops its own child processes
                    h.proc.terminate()
                    h.proc.join(timeout=6.0)
                if h.proc.is_alive():
                    h.proc.kill()
                    h.proc.join(timeout=5.0)
            if h.conn is not None:
                try:
                    h.conn.close()
                except OSError:
                    pass
        self.pg = None
        self.store = None
        self._shm.clear()
        if self._old_threads is not None:
            torch.set_num_threads(self._old_threads)
            self._old_threads = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # a trainer that forgot close(): do not leave processes behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def cli_main(argv: List[str]) -> None:
    """``python -m rlkit rollout-worker recipe=R.yaml [k=v ...] --listen HOST:PORT``."""
    argv = list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print("usage: python -m rlkit rollout-worker recipe=R.yaml [k=v ...] --listen HOST:PORT\n\n"
              "Serve one trainer as a rollout worker (rollout.max_staleness >= 1 with rollout.worker_addresses).  Use the\n"
              "trainer's recipe and overrides; the trainer checks on connect that the configs agree.  The control\n"
              "connection is authenticated with RLKIT_WORKER_AUTHKEY (set it on both machines).  docs/async.md")
        return
    listen = None
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--listen":
            listen = next(it, None)
        elif a.startswith("--listen="):
            listen = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not listen:
        raise RolloutWorkerError("rollout-worker: --listen HOST:PORT is required (e.g. --listen 0.0.0.0:29600)", kind="config")
    from ..config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rollout-worker: %(message)s")
    cfg = load_config(rest)
    worker_main(cfg, listen)
