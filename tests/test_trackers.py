"""Trackers through accelerate (rlkit/trackers.py): trainer.log_with, wandb mode / login / resume, old keys."""
import glob
import json
import os

import pytest

from rlkit.config import ConfigError, load_config
from rlkit.trainer import Trainer
from tests.conftest import tiny_overrides


def make(tmp_path, rows, *extra, accelerator=None, **kw):
    return Trainer(load_config(tiny_overrides(tmp_path, **kw) + list(extra)), train_rows=rows, accelerator=accelerator)


def _offline_runs(run_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))


def test_resume_continues_the_same_wandb_run_and_tensorboard(tmp_path, echo_rows, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k in ("WANDB_X_DISABLE_STATS", "WANDB_X_DISABLE_META", "WANDB_X_DISABLE_MACHINE_INFO"):  # faster start
        monkeypatch.setenv(k, "true")
    kw = {"trainer.log_with": "[tensorboard, wandb]", "trainer.wandb_mode": "offline", "trainer.save_final": True}
    a = make(tmp_path, echo_rows, **kw, **{"trainer.total_steps": 1})
    a.train()
    rid = open(os.path.join(a.run_dir, "wandb_run_id")).read().strip()
    assert _offline_runs(a.run_dir) and all(r.endswith("-" + rid) for r in _offline_runs(a.run_dir))
    # the completions table (bounded) went to wandb
    tables = glob.glob(os.path.join(a.run_dir, "wandb", "offline-run-*", "files", "media", "table", "completions_*.table.json"))
    assert tables, os.listdir(glob.glob(os.path.join(a.run_dir, "wandb", "offline-run-*"))[0])
    t = json.load(open(tables[0]))
    assert t["columns"][:3] == ["prompt", "completion", "reward"] and 0 < len(t["data"]) <= 64
    b = make(tmp_path, echo_rows, **kw, **{"trainer.total_steps": 2, "trainer.resume": "auto"})
    assert b.run_dir == a.run_dir
    b.train()
    runs = _offline_runs(b.run_dir)
    assert len(runs) == 2 and all(r.endswith("-" + rid) for r in runs), runs   # one wandb run id for both
    events = glob.glob(os.path.join(a.run_dir, "rlkit", "events.out.tfevents*"))
    assert len(events) >= 2   # TensorBoard: RUN/<tracker_project>/, one events file per launch


def test_an_accelerator_passed_in_gets_the_trackers(tmp_path, echo_rows):
    from accelerate import Accelerator

    tr = make(tmp_path, echo_rows, accelerator=Accelerator(cpu=True),
              **{"trainer.log_with": "[tensorboard]", "trainer.total_steps": 1})
    tr.train()
    assert glob.glob(os.path.join(tr.run_dir, "rlkit", "events.out.tfevents*"))
    assert os.path.getsize(os.path.join(tr.run_dir, "metrics.jsonl")) > 0


def test_wandb_online_without_login_fails_before_the_model_loads(tmp_path, echo_rows, monkeypatch):
    pytest.importorskip("wandb")
    import rlkit.trainer as trainer_mod

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr(trainer_mod, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded"))
    with pytest.raises(ConfigError, match=r"^trainer.wandb_mode=online: no wandb login \(run `wandb login`"):
        make(tmp_path, echo_rows, **{"trainer.log_with": "[wandb]"})
    # a login in the netrc file is enough (no network is asked)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    from rlkit.trackers import _wandb_logged_in

    assert _wandb_logged_in()


def test_tracker_names_and_old_keys_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.log_with: unknown tracker 'tensorbord'. Did you mean: tensorboard\?"):
        load_config(tiny_overrides(tmp_path, **{"trainer.log_with": "[tensorbord]"}))
    for old, new in (("trainer.tensorboard=false", "trainer.log_with"), ("trainer.wandb=true", "trainer.log_with=\\[wandb\\]"),
                     ("trainer.wandb_project=x", "trainer.tracker_project")):
        with pytest.raises(ConfigError, match=rf"^{old.split('=')[0]} was replaced: use {new}"):
            load_config(tiny_overrides(tmp_path) + [old])
    with pytest.raises(ConfigError, match="trainer.wandb_mode"):
        load_config(tiny_overrides(tmp_path, **{"trainer.wandb_mode": "sometimes"}))


def test_an_uninstalled_tracker_is_named(tmp_path, echo_rows):
    from accelerate.tracking import get_available_trackers

    from rlkit.trackers import PACKAGES, check_available

    missing = sorted(set(PACKAGES) - {str(x) for x in get_available_trackers()})
    if not missing:
        pytest.skip("every tracker is installed here")
    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.log_with": f"[{missing[0]}]"}))
    with pytest.raises(ConfigError, match=rf"^trainer.log_with: {missing[0]} is not installed here \(pip install {PACKAGES[missing[0]]}"):
        check_available(cfg)


def test_flat_config_is_scalars():
    from rlkit.trackers import flat_config

    assert flat_config({"trainer": {"lr": 1e-6, "adam_betas": [0.9, 0.99], "run_name": None}, "recipe": "r.yaml"}) == {
        "trainer.lr": 1e-6, "trainer.adam_betas": "[0.9, 0.99]", "trainer.run_name": "null", "recipe": "r.yaml"}
