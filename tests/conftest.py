"""Shared fixtures.  Core tests build their own tiny model (rlkit.toy) and data;
tests that read ../shared skip cleanly when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _toy_cache(tmp_path_factory):
    """Keep toy models out of the user's home cache."""
    d = tmp_path_factory.mktemp("rlkit_cache")
    old = os.environ.get("RLKIT_CACHE")
    os.environ["RLKIT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("RLKIT_CACHE", None)
    else:
        os.environ["RLKIT_CACHE"] = old


@pytest.fixture(scope="session")
def toy_model_dir(_toy_cache):
    from rlkit.toy import resolve

    return resolve("toy:tiny")


@pytest.fixture()
def echo_rows():
    from rlkit.toy import echo_rows as make

    return make(256, seed=0)


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is optional)")
    return p


def tiny_overrides(tmp_path, **extra):
    """Config overrides for a fast in-process run on the toy echo task."""
    base = {
        "model.name_or_path": "toy:tiny",
        "data.prompt_field": "question",
        "data.answer_field": "answer",
        "data.max_prompt_tokens": 32,
        "rollout.samples_per_prompt": 4,
        "rollout.max_new_tokens": 6,
        "reward.functions": "[" + str(REPO / "rewards" / "toy.py") + ":echo]",
        "trainer.prompts_per_step": 4,
        "trainer.total_steps": 3,
        "trainer.lr": 3e-3,
        "trainer.output_dir": str(tmp_path),
        "trainer.run_name": "t",
        "trainer.progress_bar": False,
        "trainer.log_with": "[]",
        "trainer.save_final": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def resume_pair(make, tmp_path, at: int = 2):
    """Train ``make(dir)`` uninterrupted, and again with a checkpoint at step ``at``, one more step lost
    (the "kill") and ``trainer.resume=auto``.  ``make(dir, **overrides)`` returns a Trainer.
    Returns ``(uninterrupted, resumed, metrics_uninterrupted, metrics_resumed)``."""
    a = make(tmp_path / "a")
    a.train()
    b = make(tmp_path / "b")
    for _ in range(at):
        b.step()
    b.save_checkpoint()
    b.step()  # written to metrics.jsonl, then lost
    del b
    c = make(tmp_path / "b", **{"trainer.resume": "auto"})
    assert c.step_idx == at
    c.train()
    return a, c, read_metrics(a.run_dir), read_metrics(c.run_dir)


def assert_same_metrics(ma, mc, keys):
    assert [r["step"] for r in mc] == [r["step"] for r in ma]
    for k in keys:
        assert [r[k] for r in mc] == pytest.approx([r[k] for r in ma], rel=1e-5, abs=1e-7), k


def launch_recipe(recipe: str, tmp_path, *extra: str, timeout: int = 600):
    """Run a recipe's ``tiny`` profile the way users launch it
    (``python launch/train.py recipe=recipes/<recipe>.yaml profile=tiny ...``) and return
    ``(metrics rows, run directory)``."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), f"recipe=recipes/{recipe}.yaml", "profile=tiny",
           f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    run = next(d for d in Path(tmp_path).iterdir() if (d / "metrics.jsonl").exists())
    return read_metrics(run), run
