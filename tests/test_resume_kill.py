"""Real kills: SIGKILL a training process after its step-2 checkpoint, or in the middle of writing its first
checkpoint, resume with ``trainer.resume=auto``, and compare every step's metrics (and completions) with an
uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

KEYS = ("reward/mean", "loss/policy", "grad_norm", "entropy/mean", "response_length/mean")


def cmd(out, *extra):
    return [sys.executable, str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml",
            f"data.path={REPO}/recipes/data/echo_train.jsonl", f"data.eval_path={REPO}/recipes/data/echo_test.jsonl",
            f"reward.functions=[{REPO}/rewards/toy.py:echo]", "trainer.total_steps=5", "trainer.prompts_per_step=8",
            "rollout.samples_per_prompt=4", "trainer.save_every=2", "trainer.progress_bar=false",
            f"trainer.output_dir={out}", "trainer.run_name=r", "trainer.log_with=[]", *extra]


def metrics(run):
    return [json.loads(l) for l in open(run / "metrics.jsonl")]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_model_dir):
    """The uninterrupted run (shared by the kill tests)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cmd(out, f"model.name_or_path={toy_model_dir}"), check=True, env=ENV, capture_output=True, timeout=600)
    return out / "r"


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, toy_model_dir, reference):
    env = ENV
    model = f"model.name_or_path={toy_model_dir}"
    ref = metrics(reference)

    # slow the victim down after step 2 so the kill lands mid-run, after the step-2 checkpoint
    p = subprocess.Popen(cmd(tmp_path / "b", model), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "b" / "r" / "checkpoints" / "step_2"
    deadline = time.time() + 600
    while not ck.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    if p.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "b" / "r" / "checkpoints" / "step_4").exists()
    subprocess.run(cmd(tmp_path / "b", model, "trainer.resume=auto"), check=True, env=env, capture_output=True, timeout=600)
    got = metrics(tmp_path / "b" / "r")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for k in KEYS:
        assert [r[k] for r in got] == pytest.approx([r[k] for r in ref], rel=1e-5, abs=1e-7), k


# the victim SIGKILLs itself inside the write of its first checkpoint (step_2): every file of step_2.tmp is
# written, the manifest that completes it is not
KILL_IN_FIRST_WRITE = """
import os, signal, sys
import rlkit.checkpoint as c
orig = c.write_manifest
def write_manifest(tmp, step, world):
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(tmp, step, world)
c.write_manifest = write_manifest
from rlkit.cli import train_main
train_main(sys.argv[1:])
"""


def test_sigkill_during_first_checkpoint_write_then_resume_matches(tmp_path, toy_model_dir, reference):
    """No complete checkpoint: resume=auto starts over, and metrics.jsonl / completions.jsonl hold each step once."""
    model = f"model.name_or_path={toy_model_dir}"
    victim = cmd(tmp_path, model)
    p = subprocess.run([sys.executable, "-c", KILL_IN_FIRST_WRITE, *victim[2:]], cwd=REPO, env=ENV, capture_output=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run = tmp_path / "r"
    assert (run / "checkpoints" / "step_2.tmp").is_dir() and not (run / "checkpoints" / "step_2").exists()
    assert [r["step"] for r in metrics(run)] == [1, 2]
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    Trainer(load_config(cmd(tmp_path, model, "trainer.resume=auto")[2:])).train()  # the resume need not be a new process
    got, ref = metrics(run), metrics(reference)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for k in KEYS:
        assert [r[k] for r in got] == pytest.approx([r[k] for r in ref], rel=1e-5, abs=1e-7), k
    comp = lambda d: [(c["step"], c["completion"]) for c in map(json.loads, open(d / "completions.jsonl"))]  # noqa: E731
    assert comp(run) == comp(reference)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_4", "step_5"]  # the stale step_2.tmp was cleared
