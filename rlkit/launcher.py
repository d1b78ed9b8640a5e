"""``python -m rlkit launch ...``: accelerate's own launcher, minus its traceback when a rank fails.

    python -m rlkit launch --config_file launch/accelerate_cpu.yaml launch/train.py recipe=recipes/quickstart.yaml

takes exactly ``accelerate launch``'s arguments and runs ``accelerate.commands.launch.launch_command``.  When a
rank exits non-zero, the rank itself has already printed rlkit's one-line message (``config error: ...``); plain
``accelerate launch`` then adds torch elastic's failure report and a Python traceback of the launcher (dozens of
lines).  This wrapper keeps the one line: it silences torch elastic's own log lines, catches the launcher's
``ChildFailedError`` (or ``CalledProcessError``) and exits with the failing rank's exit code.  Everything else
(multi-node flags, DeepSpeed configs, environment) is accelerate's; nothing here starts a process itself.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import List, Optional


def failed_exit_code(exc: BaseException) -> Optional[int]:
    """The exit code of the rank that failed first, for the launcher's exceptions; None for anything else."""
    if isinstance(exc, subprocess.CalledProcessError):
        return exc.returncode
    get_first = getattr(exc, "get_first_failure", None)  # torch.distributed.elastic ChildFailedError
    if callable(get_first):
        _, failure = get_first()
        return failure.exitcode
    return None


def launch_main(argv: Optional[List[str]] = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except Exception as e:  # noqa: BLE001 - only the launcher's "a child failed" exceptions are handled
        code = failed_exit_code(e)
        if code is None:
            raise
        raise SystemExit(code if code > 0 else 1) from None
