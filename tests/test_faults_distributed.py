"""Fault suite, distributed runs (issue 9, items 7 and 12): real processes, real signals.

* A stalled rank: a 2-rank CPU run (accelerate's torchrun launcher, gloo, like launch/accelerate_cpu.yaml) whose
  rank 1 gets SIGSTOP after step 1.  Rank 0 must exit non-zero with one line naming rank 1 (heartbeat watchdog,
  ``trainer.distributed_timeout_s``), instead of blocking in a collective for gloo's default 30 minutes.
* A user error under ``accelerate launch`` with 2 processes: rlkit's line appears once, not once per rank.

Every process the test starts is SIGKILLed at the end (the launcher starts its ranks in their own sessions, so
they are found by parent pid)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

TIMEOUT_S = 5


def _children(pid: int):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def _descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _env_of(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_all(proc: subprocess.Popen, pids):
    for p in set(pids) | set(_descendants(proc.pid)) | {proc.pid}:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _launch(tmp_path, *extra, steps=200, launcher=("accelerate.commands.launch",), stdout=subprocess.DEVNULL):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", *launcher, "--config_file", str(REPO / "launch" / "accelerate_cpu.yaml"),
           str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml",
           f"data.path={REPO}/recipes/data/echo_train.jsonl", "data.eval_path=null", f"reward.functions=[{REPO}/rewards/toy.py:echo]",
           f"trainer.total_steps={steps}", "trainer.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
           f"trainer.output_dir={tmp_path}", "trainer.run_name=stall", "trainer.save_every=0", "trainer.save_final=false",
           "trainer.progress_bar=false", "trainer.log_with=[]", *extra]
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=err if stdout is None else stdout, stderr=err,
                            start_new_session=True)
    return proc, err


def _wait(cond, limit: float, proc=None):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(0.2)
    return False


def test_stalled_rank_is_named_and_the_others_exit(tmp_path, toy_model_dir):
    proc, err = _launch(tmp_path, f"trainer.distributed_timeout_s={TIMEOUT_S}")
    ranks = {}
    try:
        metrics = tmp_path / "stall" / "metrics.jsonl"
        assert _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 240, proc), \
            (tmp_path / "stderr.txt").read_text()[-3000:]
        for p in _children(proc.pid):
            r = _env_of(p).get("RANK")
            if r is not None:
                ranks[int(r)] = p
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        # rank 0 must leave by itself (the hang guard is generous: gloo's default would be 30 minutes)
        assert _wait(lambda: not _alive(ranks[0]), TIMEOUT_S + 60), "rank 0 still blocked on the stopped rank 1"
        text = (tmp_path / "stderr.txt").read_text()
        lines = [l for l in text.splitlines() if "distributed error:" in l]
        assert len(lines) == 1, text[-3000:]
        assert lines[0].startswith("distributed error: rank 1 has not reported for"), lines
        assert "trainer.distributed_timeout_s=5" in lines[0]
        assert "Traceback" not in text.split("distributed error:")[0]  # nothing from rlkit before the launcher's report
    finally:
        _kill_all(proc, ranks.values())
        err.close()
    assert _wait(lambda: not any(_alive(p) for p in ranks.values()), 30), "a rank survived SIGKILL"


def test_user_error_under_rlkit_launch_prints_one_line(tmp_path, toy_model_dir):
    """``python -m rlkit launch`` = accelerate's launcher with 2 CPU ranks: both ranks fail on the same bad value, one
    line is printed in all (stdout and stderr together), and the exit code is the rank's (2), not the launcher's 1.
    (Plain ``accelerate launch`` prints the same single rlkit line, then its own ChildFailedError report.)"""
    proc, err = _launch(tmp_path, "trainer.lr=-1", launcher=("rlkit", "launch"), stdout=None)
    try:
        proc.wait(timeout=300)
    finally:
        _kill_all(proc, [])
        err.close()
    text = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 2, text[-3000:]
    assert text.splitlines() == ["config error: trainer.lr must be > 0, got -1.0"], text[-3000:]
