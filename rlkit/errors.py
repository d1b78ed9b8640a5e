"""User errors: one line, a non-zero exit, never a traceback.

Every error a user can cause (a config value, a recipe file, a data file, a reward function, a checkpoint,
the output directory, vLLM set-up, a stalled rank) is an instance of :class:`UserError` whose ``kind`` names
what is wrong.  :func:`run_cli` runs an entry point and turns such an error into one line on stderr::

    config error: trainer.lr must be > 0 and finite, got -0.001
    data error: data/train.jsonl:7: ...
    distributed error: rank 1 has not reported for 10 s (stopped, hung or dead)

and exits with :data:`EXIT_USER_ERROR`.  Under ``accelerate launch`` / ``torchrun`` every rank usually hits the
same error; only the first rank on a machine to fail prints it (an exclusive lock file keyed on the launcher),
the others exit with the same code silently.  A bug in rlkit itself is not a ``UserError`` and keeps its
traceback; ``RLKIT_TRACEBACK=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_DISTRIBUTED = 3


class UserError(Exception):
    """Base of every user-caused error; ``kind`` is the word before ``error:`` in the one-line message."""

    kind = "user"
    exit_code = EXIT_USER_ERROR


class DistributedError(UserError, RuntimeError):
    kind = "distributed"
    exit_code = EXIT_DISTRIBUTED


class VLLMSetupError(UserError, RuntimeError):
    kind = "vllm"


class WeightSyncError(UserError, RuntimeError):
    """The rollout engine samples from other weights than the trainer's (the log-prob gap check)."""

    kind = "weight sync"


def _known_user_errors():
    """Error classes defined elsewhere that are user errors even if they do not derive from UserError."""
    out = [UserError]
    for mod, name in (("rlkit.rollout.vllm_adapter", "VLLMUnavailable"), ("rlkit.data", "DataError"), ("rlkit.checkpoint", "CheckpointError"),
                      ("rlkit.rewarding", "RewardError"), ("rlkit.registry", "PluginError")):
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def kind_of(e: BaseException) -> str:
    k = getattr(e, "kind", None)
    if isinstance(k, str) and k:
        return k
    name = type(e).__name__
    return {"VLLMUnavailable": "vllm", "DataError": "data", "CheckpointError": "checkpoint", "RewardError": "reward",
            "PluginError": "config", "ConfigError": "config"}.get(name, name.replace("Error", "").lower() or "user")


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    kind = kind_of(e)
    prefix = f"{kind} error: "
    return msg if msg.startswith(prefix) else prefix + msg


def _launch_key() -> str | None:
    """Identifies this launch on this machine (None outside torchrun/accelerate launch)."""
    if os.environ.get("LOCAL_RANK") is None and os.environ.get("RANK") is None:
        return None
    parts = [os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
             os.environ.get("MASTER_PORT", ""), str(os.getppid())]
    return "-".join(p.replace(os.sep, "_") for p in parts)


def report_once(line: str) -> bool:
    """Print ``line`` to stderr unless another rank of this launch (on this machine) already reported.
    Returns whether this process printed it."""
    key = _launch_key()
    if key is not None:
        path = os.path.join(tempfile.gettempdir(), f"rlkit-error-{key}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        except OSError:  # an unwritable temp dir: better every rank than none
            fd = None
        if fd is not None:
            os.write(fd, line.encode() + b"\n")
            os.close(fd)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return True


def run_cli(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run ``fn``; a user error becomes one line on stderr (first rank only) and ``SystemExit`` with a
    non-zero code.  Other exceptions propagate with their traceback (a bug in rlkit)."""
    if os.environ.get("RLKIT_TRACEBACK") == "1":  # debugging: every error with its traceback
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except SystemExit as e:
        if not isinstance(e.code, str):  # exit codes pass through; a message is a one-line error too
            raise
        line, code = " ".join(e.code.split()), EXIT_USER_ERROR
    except _known_user_errors() as e:
        line, code = one_line(e), getattr(e, "exit_code", EXIT_USER_ERROR)
    try:
        sys.stdout.flush()
    except Exception:  # pragma: no cover - a closed stdout
        pass
    report_once(line)
    if os.environ.get("LOCAL_RANK") is not None:
        # several processes: leave at once, without interpreter teardown (a peer may still sit in a collective
        # whose threads would keep this process alive, and vLLM/tokenizer threads may print at exit)
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)
