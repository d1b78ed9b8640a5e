"""Fault suite, issue 9 items 1-5 and 13: non-finite updates, resume branches and changed settings, logs of a run
killed before its first checkpoint, damaged checkpoints, a full disk, and checkpoints that carry code.
Every fault is real (a NaN gradient from a hooked parameter, truncated/deleted/edited files, a small tmpfs that
really fills up, a pickle that would run a command); the in-process toy trainer keeps it fast.
The real-process SIGKILLs are in tests/test_resume_kill.py."""
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch

from rlkit import checkpoint as ckpt
from rlkit.checkpoint import CheckpointError
from rlkit.config import load_config
from rlkit.trainer import Trainer
from tests.conftest import read_metrics, tiny_overrides

KEYS = ("reward/mean", "loss/policy", "grad_norm", "entropy/mean")


def make(out, rows, **kw):
    return Trainer(load_config(tiny_overrides(out, **kw)), train_rows=rows)


def steps_of(path):
    with open(path) as f:
        return [json.loads(l)["step"] for l in f]


def ckpts(run_dir):
    return [os.path.basename(p) for p in ckpt.candidates(os.path.join(run_dir, "checkpoints"))]


def params(tr):
    return [p.detach().clone() for p in tr.policy.parameters()]


# --------------------------------------------------------------- 1. non-finite gradients and weights
def test_nonfinite_grad_skips_update_with_clipping_off(tmp_path, echo_rows, caplog):
    """A NaN gradient (a hooked parameter, loss finite) with trainer.max_grad_norm=0 skips the update; the real
    norm is logged when finite; the checkpoint written afterwards is finite."""
    tr = make(tmp_path, echo_rows, **{"trainer.max_grad_norm": 0, "trainer.total_steps": 2})
    before = params(tr)
    hook = next(tr.policy.parameters()).register_hook(lambda g: g * float("nan"))
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        m = tr.step()
    assert m["train/skipped_nonfinite"] == 1.0 and "grad_norm" not in m
    assert "update skipped" in caplog.text and "nan" in caplog.text
    for p, q in zip(before, tr.policy.parameters()):
        assert torch.equal(p, q)                      # weights untouched, optimizer never stepped
    assert not tr.optimizer.state or all(torch.isfinite(v).all() for s in tr.optimizer.state.values()
                                         for v in s.values() if torch.is_tensor(v))
    hook.remove()
    m = tr.step()
    assert m["grad_norm"] > 0                         # measured with clipping off (it was logged as 0)
    assert "train/skipped_nonfinite" not in m
    path = tr.save_checkpoint()
    ckpt.verify(path, 1)


def test_nonfinite_weights_or_optimizer_state_never_checkpointed(tmp_path, echo_rows):
    tr = make(tmp_path, echo_rows)
    tr.step()
    good = tr.save_checkpoint()
    tr.step()
    p = next(tr.policy.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"step_2: not written: .*weight is not finite") as e:
        tr.save_checkpoint()
    assert "\n" not in str(e.value)
    with torch.no_grad():
        p.copy_(saved)
    st = next(iter(tr.optimizer.state.values()))
    st["exp_avg_sq"].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"optimizer state\[0\]\.exp_avg_sq is not finite"):
        tr.save_checkpoint()
    assert ckpts(tr.run_dir) == ["step_1"]            # no step_2, no step_2.tmp; step_1 intact
    ckpt.verify(good, 1)


# --------------------------------------------------------------- 2. resume from an older checkpoint
def test_resume_older_checkpoint_branches_and_applies_new_lr(tmp_path, echo_rows, caplog):
    """An 4-step run saving every step; resume=<step_2> with a 10x lr: the abandoned step_3/step_4 and their log
    lines move to checkpoints/abandoned-*/, the new branch is trained and saved (final save included), and the
    logged lr is the new one under the same linear schedule."""
    kw = {"trainer.total_steps": 4, "trainer.save_every": 1, "trainer.keep_checkpoints": 10, "trainer.save_final": True,
          "trainer.lr_schedule": "linear", "trainer.lr": 5e-3}
    a = make(tmp_path, echo_rows, **kw)
    a.train()
    old_lr = [r["lr"] for r in read_metrics(a.run_dir)]
    assert old_lr == pytest.approx([5e-3 * 3 / 4, 5e-3 * 2 / 4, 5e-3 * 1 / 4, 0.0])
    old4 = open(os.path.join(a.run_dir, "checkpoints", "step_4", "manifest.json")).read()
    del a
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        b = make(tmp_path, echo_rows, **{**kw, "trainer.lr": 5e-2,
                                         "trainer.resume": str(tmp_path / "t" / "checkpoints" / "step_2")})
    assert b.step_idx == 2
    assert "lr 0.005 -> 0.05" in caplog.text
    assert "new branch" in caplog.text and "step_3" in caplog.text and "step_4" in caplog.text
    d = os.path.join(b.run_dir, "checkpoints")
    aside = [x for x in os.listdir(d) if x.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(os.listdir(os.path.join(d, aside[0]))) == [
        "completions.jsonl", "metrics.jsonl", "step_3", "step_4"]
    assert steps_of(os.path.join(d, aside[0], "metrics.jsonl")) == [3, 4]
    b.train()
    assert ckpts(b.run_dir) == ["step_1", "step_2", "step_3", "step_4"]
    new4 = open(os.path.join(d, "step_4", "manifest.json")).read()
    assert new4 != old4                               # the new branch's step 4 was saved, not skipped
    m = read_metrics(b.run_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["lr"] for r in m] == pytest.approx([5e-3 * 3 / 4, 5e-3 * 2 / 4, 5e-2 * 1 / 4, 0.0])
    assert b.optimizer.param_groups[0]["initial_lr"] == 5e-2


# --------------------------------------------------------------- 3. killed before the first checkpoint
def test_resume_auto_without_checkpoint_starts_logs_fresh(tmp_path, echo_rows):
    a = make(tmp_path / "a", echo_rows)
    a.train()
    b = make(tmp_path / "b", echo_rows)
    b.step()
    b.step()                                          # logged, then "killed" before any checkpoint
    del b
    c = make(tmp_path / "b", echo_rows, **{"trainer.resume": "auto"})
    assert c.step_idx == 0
    c.train()
    assert steps_of(os.path.join(c.run_dir, "metrics.jsonl")) == [1, 2, 3]
    assert steps_of(os.path.join(c.run_dir, "completions.jsonl")) == steps_of(os.path.join(a.run_dir, "completions.jsonl"))
    ma, mc = read_metrics(a.run_dir), read_metrics(c.run_dir)
    for k in KEYS:
        assert [r[k] for r in mc] == pytest.approx([r[k] for r in ma], rel=1e-5, abs=1e-7), k


def test_truncate_log_in_place_drops_half_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    ino = os.stat(p).st_ino
    assert ckpt.truncate_log(str(p), 2, aside=str(tmp_path / "aside.jsonl")) == 2
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n' and os.stat(p).st_ino == ino  # in place: no free space needed
    assert (tmp_path / "aside.jsonl").read_text() == '{"step": 3}\n{"ste'


# --------------------------------------------------------------- 4. damaged checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with intact checkpoints step_1 and step_2 (copied per test)."""
    from rlkit.toy import echo_rows as rows

    out = tmp_path_factory.mktemp("two_ckpts")
    tr = make(out, rows(256, seed=0), **{"trainer.total_steps": 2, "trainer.save_every": 1, "trainer.save_final": True})
    tr.train()
    return out


def _truncate(f):
    with open(f, "r+b") as h:
        h.truncate(os.path.getsize(f) // 2)


def _flip(f):
    with open(f, "r+b") as h:
        h.seek(os.path.getsize(f) // 2)
        b = h.read(1)
        h.seek(-1, 1)
        h.write(bytes([b[0] ^ 0xFF]))


def _unlist(ck, rel):
    """Delete a file and its manifest entry: a consistent manifest that lacks it."""
    os.remove(os.path.join(ck, rel))
    m = json.load(open(os.path.join(ck, "manifest.json")))
    del m["files"][rel]
    json.dump(m, open(os.path.join(ck, "manifest.json"), "w"))


DAMAGE = {  # name -> (file, how, the error's words)
    "state_weights_truncated": ("state/model.safetensors", _truncate, "truncated or damaged"),
    "state_weights_deleted": ("state/model.safetensors", os.remove, "missing"),
    "optimizer_deleted": ("state/optimizer.bin", os.remove, "missing"),
    "rng_truncated": ("state/random_states_0.pkl", _truncate, "truncated or damaged"),
    "hf_weights_truncated": ("model/model.safetensors", _truncate, "truncated or damaged"),
    "optimizer_truncated": ("state/optimizer.bin", _truncate, "truncated or damaged"),
    "optimizer_bitflip": ("state/optimizer.bin", _flip, "sha256 differs"),
    "rlkit_pt_deleted": ("rlkit.pt", os.remove, "missing"),
    "plugins_deleted": ("plugins_rank0.pt", os.remove, "missing"),
    "rng_deleted": ("state/random_states_0.pkl", os.remove, "missing"),
    "rng_unlisted": ("state/random_states_0.pkl", None, "missing RNG state of rank 0"),
    "scheduler_deleted": ("state/custom_checkpoint_0.pkl", os.remove, "missing"),
    "manifest_deleted": ("manifest.json", os.remove, "missing"),
    "manifest_garbled": ("manifest.json", _truncate, "unreadable manifest"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint(case, two_checkpoints, tmp_path, echo_rows):
    """resume=DIR names the damaged file in a one-line error, before any model loads."""
    out = tmp_path / "o"
    shutil.copytree(two_checkpoints, out)
    ck = out / "t" / "checkpoints" / "step_2"
    rel, how, words = DAMAGE[case]
    _unlist(ck, rel) if how is None else how(ck / rel)
    with pytest.raises(CheckpointError) as e:
        make(out, echo_rows, **{"trainer.resume": str(ck), "trainer.total_steps": 3})
    msg = str(e.value)
    assert "\n" not in msg and str(ck / rel) in msg and words in msg, msg


@pytest.mark.parametrize("damage", ["state/model.safetensors", "manifest.json", "state/random_states_0.pkl"])
def test_resume_auto_falls_back_past_damage(damage, two_checkpoints, tmp_path, echo_rows, caplog):
    out = tmp_path / "o"
    shutil.copytree(two_checkpoints, out)
    ck = out / "t" / "checkpoints" / "step_2"
    (_truncate if damage.endswith("safetensors") else os.remove)(ck / damage)
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        tr = make(out, echo_rows, **{"trainer.resume": "auto", "trainer.total_steps": 3, "trainer.save_final": True})
    assert tr.step_idx == 1 and str(ck / damage) in caplog.text
    assert "step_2" in caplog.text and "moved" in caplog.text
    aside = [x for x in os.listdir(out / "t" / "checkpoints") if x.startswith("abandoned-")]
    assert len(aside) == 1 and "step_2" in os.listdir(out / "t" / "checkpoints" / aside[0])
    tr.train()
    assert steps_of(os.path.join(tr.run_dir, "metrics.jsonl")) == [1, 2, 3] and ckpts(tr.run_dir) == ["step_1", "step_3"]


def test_resume_auto_with_every_checkpoint_damaged_is_an_error(two_checkpoints, tmp_path, echo_rows):
    out = tmp_path / "o"
    shutil.copytree(two_checkpoints, out)
    for s in ("step_1", "step_2"):
        os.remove(out / "t" / "checkpoints" / s / "state" / "optimizer.bin")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        make(out, echo_rows, **{"trainer.resume": "auto"})
    assert "\n" not in str(e.value) and "step_1/state/optimizer.bin" in str(e.value)


def test_cli_prints_one_line_checkpoint_error(two_checkpoints, tmp_path, capsys):
    """The command line entry (rlkit.cli.train_main): a damaged explicit resume exits with one line."""
    from rlkit.cli import train_main
    from tests.conftest import REPO

    out = tmp_path / "o"
    shutil.copytree(two_checkpoints, out)
    ck = out / "t" / "checkpoints" / "step_2"
    _truncate(ck / "state" / "optimizer.bin")
    with pytest.raises(SystemExit) as e:
        train_main(tiny_overrides(out, **{"data.path": f"{REPO}/recipes/data/echo_train.jsonl", "trainer.resume": str(ck)}))
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    msg = err[-1]
    assert msg.startswith("checkpoint error: ") and "Traceback" not in "".join(err)
    assert "step_2/state/optimizer.bin" in msg and "truncated" in msg


# --------------------------------------------------------------- 13. data, never code
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reseal(ck):
    """What an attacker would do: make the manifest match the edited files."""
    m = json.load(open(ck / "manifest.json"))
    for rel in m["files"]:
        m["files"][rel] = {"size": os.path.getsize(ck / rel), "sha256": ckpt._sha256(str(ck / rel))}
    json.dump(m, open(ck / "manifest.json", "w"))


@pytest.mark.parametrize("rel", ["rlkit.pt", "plugins_rank0.pt", "state/custom_checkpoint_0.pkl", "state/optimizer.bin"])
def test_checkpoint_with_code_is_refused(rel, two_checkpoints, tmp_path, echo_rows):
    out = tmp_path / "o"
    shutil.copytree(two_checkpoints, out)
    ck = out / "t" / "checkpoints" / "step_2"
    marker = tmp_path / "pwned"
    state = torch.load(ck / rel, weights_only=False)  # the real content, plus a payload
    state["x"] = _Evil(marker)
    torch.save(state, ck / rel)
    _reseal(ck)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        make(out, echo_rows, **{"trainer.resume": str(ck)})
    assert "\n" not in str(e.value) and rel in str(e.value) and "system" in str(e.value)
    assert not marker.exists()


def test_load_data_refuses_plain_pickle(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    f = tmp_path / "rlkit.pt"
    f.write_bytes(pickle.dumps({"step": 1, "x": _Evil(marker)}))
    with pytest.raises(CheckpointError, match="not a torch.save archive"):
        ckpt.check_pickle(str(f), str(f))
    with pytest.raises(CheckpointError, match="cannot be read as data"):
        ckpt.load_data(str(f))
    assert not marker.exists()


# --------------------------------------------------------------- 5. disk full
class SmallDisk:
    """A real tmpfs whose size can be changed (remount); ``None`` where mounting is not allowed."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", self.path], capture_output=True)
        self.ok = r.returncode == 0

    def leave_free(self, nbytes):
        used = shutil.disk_usage(self.path).used
        size = (used + int(nbytes)) // 4096 * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", self.path], check=True, capture_output=True)

    def close(self):
        if self.ok:
            subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture()
def disk(tmp_path):
    d = SmallDisk(tmp_path / "disk")
    print("disk full via", "a real tmpfs" if d.ok else "injected ENOSPC (no tmpfs could be mounted)")
    yield d
    d.close()


def _inject_enospc(monkeypatch, when):
    """Fallback where no tmpfs can be mounted: the manifest write (the last write) fails with ENOSPC."""
    import errno

    orig = ckpt.write_manifest

    def full(tmp, step, world):
        if when(step):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(tmp, "manifest.json"))
        return orig(tmp, step, world)

    monkeypatch.setattr(ckpt, "write_manifest", full)


def test_disk_full_prunes_what_keep_would_prune_then_retries(disk, echo_rows, monkeypatch, caplog):
    """keep_checkpoints=2 on a disk that holds two checkpoints but not three: writing step_3 fails, step_1 (which
    keep=2 removes anyway) is pruned and the write retried: the run completes (it failed here before)."""
    kw = {"trainer.total_steps": 3, "trainer.save_every": 1, "trainer.keep_checkpoints": 2, "trainer.save_final": True}
    tr = make(disk.path if disk.ok else disk.path + "_plain", echo_rows, **kw)
    tr.step()
    tr.save_checkpoint()
    size = ckpt.dir_size(os.path.join(tr.run_dir, "checkpoints", "step_1"))
    if disk.ok:
        disk.leave_free(1.6 * size + 64 * 1024)       # step_2 fits, step_3 only without step_1
    else:
        calls = []
        _inject_enospc(monkeypatch, lambda s: s == 3 and not calls and not calls.append(s))  # the first try only
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        tr.train()
    assert "disk full" in caplog.text and "step_1" in caplog.text
    assert ckpts(tr.run_dir) == ["step_2", "step_3"]
    for s in ("step_2", "step_3"):
        ckpt.verify(os.path.join(tr.run_dir, "checkpoints", s), 1)


def test_disk_full_write_fails_cleanly_and_resume_on_same_disk_works(disk, echo_rows, monkeypatch):
    kw = {"trainer.total_steps": 3, "trainer.keep_checkpoints": 2, "trainer.save_final": True}
    out = disk.path if disk.ok else disk.path + "_plain"
    tr = make(out, echo_rows, **kw)
    tr.step()
    tr.save_checkpoint()
    size = ckpt.dir_size(os.path.join(tr.run_dir, "checkpoints", "step_1"))
    if disk.ok:
        disk.leave_free(0.5 * size)                   # not even one more checkpoint fits
    else:
        _inject_enospc(monkeypatch, lambda s: True)
    tr.step()
    with pytest.raises(CheckpointError, match="step_2: not written \\(no space left on device") as e:
        tr.save_checkpoint()
    assert "\n" not in str(e.value) and "['step_1'] are intact" in str(e.value)
    assert ckpts(tr.run_dir) == ["step_1"]            # the partial step_2.tmp is gone
    ckpt.verify(os.path.join(tr.run_dir, "checkpoints", "step_1"), 1)
    del tr
    # resume on the same, still full disk: loading needs no space (logs are truncated in place)
    tr = make(out, echo_rows, **{**kw, "trainer.resume": "auto"})
    assert tr.step_idx == 1 and steps_of(os.path.join(tr.run_dir, "metrics.jsonl")) == [1]
    if disk.ok:
        disk.leave_free(8 * size)                     # the user frees space
    else:
        monkeypatch.undo()
    tr.train()
    assert steps_of(os.path.join(tr.run_dir, "metrics.jsonl")) == [1, 2, 3] and ckpts(tr.run_dir) == ["step_1", "step_3"]


@pytest.mark.slow
def test_stateful_plugins_checkpoint_as_data(tmp_path):
    """EFRame buffers, D3S, UEC (probe batch, smoothed entropy) and TEMPO states in one composed run are written
    and read back as data (weights_only=True); dump, PCL, OPSD and SPO have their own resume tests."""
    from tests.conftest import REPO

    args = [f"recipe={REPO}/recipes/tempo_d3s_uec.yaml", "profile=tiny", f"trainer.output_dir={tmp_path}",
            "trainer.progress_bar=false", "trainer.log_with=[]", "trainer.total_steps=3"]
    Trainer(load_config(args)).train()
    ck = ckpt.latest_checkpoint(str(tmp_path / "tempo_d3s_uec_tiny" / "checkpoints"))
    ckpt.verify(ck, 1)
    state = ckpt.load_data(os.path.join(ck, "rlkit.pt"))
    assert state["step"] == 3 and {"filter0", "controller1"} <= set(state["plugins"])
    tr = Trainer(load_config(args[:-1] + ["trainer.total_steps=4", "trainer.resume=auto"]))
    assert tr.step_idx == 3
    tr.train()


def test_plugin_state_with_an_object_fails_at_save_not_at_resume(tmp_path, echo_rows):
    """A plugin whose state_dict holds an object of its own class: the first save says so (one line), and
    leaves no checkpoint that a resume would then refuse."""
    tr = make(tmp_path, echo_rows)
    tr.step()
    tr.selector.state_dict = lambda: {"obj": _Evil(tmp_path / "never")}
    with pytest.raises(CheckpointError, match="a plugin state holds .*weights_only=True") as e:
        tr.save_checkpoint()
    assert "\n" not in str(e.value) and "free space" not in str(e.value)
    assert not os.path.exists(os.path.join(tr.run_dir, "checkpoints", "step_1.tmp")) and ckpts(tr.run_dir) == []
