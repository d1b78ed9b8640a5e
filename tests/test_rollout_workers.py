"""Rollout workers and weight transfer (rlkit/rollout/workers.py): exact weights, strict message order, faults.

Most tests inject a small fake stage (``stage_factory=FakeStage``) that holds a real tiny torch model with fp32 and
bf16 tensors and a tied embedding; its ``run`` returns the weights it holds, so the test compares them bit for bit.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest
import torch

from rlkit.errors import one_line
from rlkit.rollout.workers import (RolloutWorkerError, RolloutWorkers, config_fingerprint, flatten_by_dtype,
                                   tensor_checksum, thread_split, unflatten, worker_main)

from .conftest import REPO, tiny_overrides

psutil = pytest.importorskip("psutil")


# ------------------------------------------------------------------ a fake stage (runs in the worker process)
class TinyLM(torch.nn.Module):
    """Embedding tied to the output head (fp32), a bf16 projection and a bf16 buffer-free bias."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 6).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied


@dataclass
class Req:
    step: int
    round: int = 0
    action: str = "weights"     # weights | sleep | reward_error | bug
    seconds: float = 0.0


class FakeStage:
    """``stage_factory`` for the tests: ``run`` returns the weights it holds and the version they came with."""

    def __init__(self, cfg, rank, world, device):
        torch.manual_seed(1234 + rank)  # other initial weights than the trainer's: a transfer must overwrite them
        self.model = TinyLM()
        self.version = -1
        self.rank, self.world, self.device = rank, world, str(device)
        self.calls = 0
        self.child = None
        if os.environ.get("FAKE_STAGE_CHILD"):  # a process of the stage's own (like a reward pool's workers)
            self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        if self.child is not None:
            self.child.kill()
            self.child.wait()

    def param_specs(self):
        return [(n, p.shape, p.dtype) for n, p in self.model.named_parameters()]

    def load_weights(self, named, version):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in named:
                params[n].copy_(t)
        self.version = version

    def weight_checksum(self):
        return tensor_checksum(p for _, p in self.model.named_parameters())

    def run(self, req):
        self.calls += 1
        if req.action == "sleep":
            time.sleep(req.seconds)
        elif req.action == "reward_error":
            from rlkit.rewarding import RewardError

            raise RewardError("rewards/bad.py:score raised ZeroDivisionError on row 3")
        elif req.action == "bug":
            raise ValueError("a bug inside the stage")
        return {"step": req.step, "round": req.round, "version": self.version, "pid": os.getpid(),
                "child": self.child.pid if self.child is not None else None,
                "rank": self.rank, "device": self.device,
                "tied": self.model.head.weight.data_ptr() == self.model.embed.weight.data_ptr(),
                "weights": {n: p.detach().clone() for n, p in self.model.named_parameters()}}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, sd):
        self.calls = sd["calls"]


def _cfg(tmp_path, **extra):
    from rlkit.config import load_config

    extra.setdefault("trainer.distributed_timeout_s", 60)
    return load_config(tiny_overrides(tmp_path, **extra), validate=False)


def _trainer_model():
    torch.manual_seed(0)
    m = TinyLM()
    with torch.no_grad():  # every tensor differs from a fresh TinyLM (LayerNorm starts at ones / zeros)
        for p in m.parameters():
            p.add_(torch.rand_like(p) + 0.5)
    return m


def _named(model):
    return [(n, p.detach()) for n, p in model.named_parameters()]


def _assert_same(model, weights):
    mine = dict(model.named_parameters())
    assert sorted(mine) == sorted(weights)
    for n, p in mine.items():
        assert weights[n].dtype == p.dtype, n
        assert torch.equal(weights[n], p.detach()), n


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ unit: flatten / fingerprint / threads
def test_flatten_is_one_buffer_per_dtype_and_inverts_bit_for_bit():
    m = _trainer_model()
    groups = flatten_by_dtype(_named(m))
    assert [d for d, _, _ in groups] == [torch.float32, torch.bfloat16]  # first-seen order
    # 11*6 (tied embedding, sent once) + 6 + 6 fp32 (norm) elements; 36 + 6 bf16 elements (proj)
    assert [b.numel() for _, b, _ in groups] == [(66 + 12) * 4, 42 * 2]
    back = dict(sum((unflatten(d, b, lay) for d, b, lay in groups), []))
    _assert_same(m, back)


def test_thread_split_gives_trainer_and_worker_half_the_cores():
    assert thread_split(1, 1, cores=2) == (1, 1)
    assert thread_split(2, 1, cores=16) == (8, 4)
    assert thread_split(1, 2, cores=16) == (4, 4)
    assert thread_split(4, 1, cores=2) == (1, 1)


def test_fingerprint_names_the_differing_key(tmp_path):
    a = config_fingerprint(_cfg(tmp_path))
    b = config_fingerprint(_cfg(tmp_path, **{"rollout.temperature": 0.7, "trainer.output_dir": "/elsewhere"}))
    assert sorted(k for k in a if a[k] != b[k]) == ["rollout.temperature"]  # output_dir may differ


# ------------------------------------------------------------------ local workers: exact weights and order
def test_local_workers_get_exact_weights_in_message_order(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.rollout.num_workers = 2   # (the key is rollout.num_workers; set on the object so this test does not need it)
    model = _trainer_model()
    specs = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
    with RolloutWorkers(cfg, 0, 1, specs, stage_factory=FakeStage) as w:
        secs = w.push_weights(_named(model), 0)
        for s in (1, 2):                       # step 1 -> worker 0, step 2 -> worker 1: both got v0
            w.submit(Req(s))
        r1, r2 = w.receive(), w.receive()
        assert (r1["step"], r2["step"]) == (1, 2) and r1["pid"] != r2["pid"]
        for r in (r1, r2):
            assert r["version"] == 0 and r["tied"] and r["rank"] == 0
            _assert_same(model, r["weights"])
        assert w.checksum(0) == tensor_checksum(p for _, p in model.named_parameters())
        assert secs >= 0 and w.last_push["bytes"] == (78 * 4 + 42 * 2)   # one push: the tied matrix is sent once

        w.submit(Req(3))                       # queued before v1: must be generated with v0
        with torch.no_grad():                  # an "optimizer step" on both dtypes
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        w.push_weights(_named(model), 1)
        w.submit(Req(4))                       # after v1
        w.submit(Req(5))
        r3, r4, r5 = w.receive(), w.receive(), w.receive()
        assert [r["version"] for r in (r3, r4, r5)] == [0, 1, 1]
        assert not torch.equal(r3["weights"]["proj.weight"], model.proj.weight)
        _assert_same(model, r4["weights"])
        _assert_same(model, r5["weights"])
        assert w.checksum(1) == tensor_checksum(p for _, p in model.named_parameters())
        assert w.state_dict() == {"workers": [{"calls": 3}, {"calls": 2}]}
        w.load_state_dict({"workers": [{"calls": 10}, {"calls": 20}]})
        assert w.state_dict() == {"workers": [{"calls": 10}, {"calls": 20}]}
        pids = [h.proc.pid for h in w.handles]
    w.close()                                  # a second close is a no-op
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


# ------------------------------------------------------------------ faults
def test_worker_faults_are_one_line_errors_never_a_hang(tmp_path):
    """A stage error is forwarded (the worker keeps serving); a worker SIGKILLed while the trainer waits in receive()
    is named with its signal; every later call says so at once; close() twice is fine."""
    w = RolloutWorkers(_cfg(tmp_path), 0, 1, stage_factory=FakeStage)
    try:
        w.submit(Req(1, action="reward_error"))
        with pytest.raises(RolloutWorkerError) as e:
            w.receive()
        assert re.fullmatch(r"reward error: worker 0 \(127\.0\.0\.1:\d+\): rewards/bad\.py:score raised "
                            r"ZeroDivisionError on row 3", one_line(e.value)), one_line(e.value)
        w.pending.clear()
        w.submit(Req(2, action="bug"))
        with pytest.raises(RolloutWorkerError) as e:
            w.receive()
        assert "rollout worker error: worker 0" in one_line(e.value) and "ValueError: a bug inside the stage" in one_line(e.value)
        w.pending.clear()
        w.submit(Req(3))                       # the worker is still serving
        assert w.receive()["step"] == 3

        w.push_weights(_named(_trainer_model()), 0)
        w.submit(Req(4, action="sleep", seconds=120))
        kill = __import__("threading").Timer(1.0, os.kill, (w.handles[0].proc.pid, signal.SIGKILL))
        kill.start()
        with pytest.raises(RolloutWorkerError) as e:
            w.receive()                        # the trainer waits here when the worker is killed
        line = one_line(e.value)  # "died", from the death check, not "silent" from the 60 s silence timeout
        assert re.fullmatch(r"rollout worker error: worker 0 \(127\.0\.0\.1:\d+\) died \(signal 9\) while it should "
                            r"generate step 4 round 0", line), line
        with pytest.raises(RolloutWorkerError, match=r"died \(signal 9\)"):
            w.push_weights(_named(_trainer_model()), 1)   # and every later call says the same, at once
    finally:
        w.close()
        w.close()


def test_unreachable_address_is_named_before_any_compute(tmp_path):
    port = _free_port()
    cfg = _cfg(tmp_path, **{"trainer.distributed_timeout_s": 1})
    cfg.rollout.worker_addresses = [f"127.0.0.1:{port}"]
    with pytest.raises(RolloutWorkerError) as e:
        RolloutWorkers(cfg, 0, 1, stage_factory=FakeStage)
    assert one_line(e.value).startswith(f"rollout worker error: worker 0 (127.0.0.1:{port}) cannot be reached: ")
    cfg.rollout.worker_addresses = ["no-such-host.invalid:29600"]
    with pytest.raises(RolloutWorkerError, match=r"worker 0 \(no-such-host\.invalid:29600\) cannot be reached"):
        RolloutWorkers(cfg, 0, 1, stage_factory=FakeStage)
    cfg.rollout.worker_addresses = ["just-a-host"]
    with pytest.raises(RolloutWorkerError, match="not host:port"):
        RolloutWorkers(cfg, 0, 1, stage_factory=FakeStage)


def _remote_worker(cfg, listen):
    import multiprocessing

    multiprocessing.current_process().authkey = os.urandom(32)  # not the trainer's child: no shared process secrets
    worker_main(cfg, listen, stage_factory=FakeStage)


def test_remote_worker_checks_the_config_and_serves(tmp_path):
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    port = _free_port()
    worker_cfg = _cfg(tmp_path, **{"rollout.temperature": 0.7})
    proc = ctx.Process(target=_remote_worker, args=(worker_cfg, f"127.0.0.1:{port}"), daemon=True)
    proc.start()
    try:
        cfg = _cfg(tmp_path)
        cfg.rollout.worker_addresses = [f"127.0.0.1:{port}"]
        with pytest.raises(RolloutWorkerError) as e:
            RolloutWorkers(cfg, 0, 1, stage_factory=FakeStage)
        assert one_line(e.value) == (f"config error: worker 0 (127.0.0.1:{port}): the worker was started with another "
                                     f"config: rollout.temperature (trainer 1.0, worker 0.7); start it with the "
                                     f"trainer's recipe and overrides")
        proc.join(30)
        assert proc.exitcode == 0
        # the same config: it serves (rank and world come from the trainer)
        port = _free_port()
        proc = ctx.Process(target=_remote_worker, args=(_cfg(tmp_path), f"127.0.0.1:{port}"), daemon=True)
        proc.start()
        cfg.rollout.worker_addresses = ["127.0.0.1:1", f"127.0.0.1:{port}"]   # two ranks, one worker each
        model = _trainer_model()
        with RolloutWorkers(cfg, 1, 2) as w:
            w.push_weights(_named(model), 7)
            w.submit(Req(1))
            r = w.receive()
            assert r["version"] == 7 and r["rank"] == 1
            _assert_same(model, r["weights"])
        proc.join(30)
        assert proc.exitcode == 0              # a remote worker serves one trainer and exits on close
    finally:
        if proc.is_alive():
            proc.kill()


_TRAINER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from tests.test_rollout_workers import FakeStage, Req, _cfg
    from rlkit.rollout.workers import RolloutWorkers
    from pathlib import Path
    cfg = _cfg(Path({tmp!r}))
    w = RolloutWorkers(cfg, 0, 1, stage_factory=FakeStage)
    w.submit(Req(1))
    print(w.handles[0].proc.pid, w.receive()["child"], flush=True)
    if {mode!r} == "raise":
        raise RuntimeError("the trainer crashed")
    time.sleep(600)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie; a process that exits between the two checks is gone, not an error."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_trainer_exit_leaves_no_worker_processes(tmp_path, mode):
    """The trainer dies (an exception / SIGKILL) with a worker whose stage started a process of its own: both go."""
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path), mode=mode))
    env = dict(os.environ, OMP_NUM_THREADS="1", FAKE_STAGE_CHILD="1")
    err = tmp_path / "stderr.txt"   # a file, not a pipe: a process left behind must not keep the test waiting
    with open(err, "w") as ferr:
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=ferr, text=True, env=env)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2, err.read_text()     # the worker and the process its stage started
        if mode == "sigkill":
            p.kill()
        p.wait(60)
        if mode == "raise":
            assert p.returncode != 0 and "RuntimeError: the trainer crashed" in err.read_text()
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [q for q in pids if _running(q)]
            time.sleep(0.2)
        assert not alive, f"processes left behind: {alive}"
    finally:
        if p.poll() is None:
            p.kill()
        for q in pids if "pids" in locals() else []:  # never leave one behind ourselves
            try:
                psutil.Process(q).kill()
            except psutil.NoSuchProcess:
                pass


def test_cli_verb_usage_and_missing_listen(capsys):
    from rlkit.__main__ import main

    main(["rollout-worker", "--help"])
    assert "--listen HOST:PORT" in capsys.readouterr().out
    with pytest.raises(RolloutWorkerError, match="--listen HOST:PORT is required"):
        main(["rollout-worker", "recipe=x.yaml"])


# ------------------------------------------------------------------ the real stage in a worker (toy model)
def test_real_stage_in_a_worker_gets_the_trainers_weights(tmp_path):
    """RolloutStage.from_config in a spawned worker: after push_weights(v) it generates with the trainer's weights
    (same checksum as the tensors sent) and its same-version log-prob probe agrees with the trainer's math."""
    from rlkit.data import load_prompts
    from rlkit.modeling import load_causal_lm, load_tokenizer
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.stage import RolloutRequest, weight_checksum
    from rlkit.toy import echo_rows

    cfg = _cfg(tmp_path, **{"rollout.max_staleness": 1, "reward.isolation": "none"})
    lm = load_causal_lm(cfg.model.name_or_path, cfg.model.dtype)
    torch.manual_seed(3)
    with torch.no_grad():  # the trainer's weights after some updates: not what the worker loaded from disk
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    rows = load_prompts(cfg.data, load_tokenizer(cfg.model.name_or_path), rows=echo_rows(8, seed=0))
    named = [(n, p.detach()) for n, p in lm.named_parameters()]
    specs = [(n, p.shape, p.dtype) for n, p in named]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens)
    with RolloutWorkers(cfg, 0, 1, specs) as w:
        w.push_weights(named, 5)
        w.submit(RolloutRequest(1, 0, [0, 1], sampling, 17, 0, {"rows": rows[:2]}))
        res = w.receive()
        assert w.checksum(5) == weight_checksum(named)
    assert res.step == 1 and res.weight_version == 5
    assert res.probe["weight_checksum"] == weight_checksum(named)
    assert len(res.rolled) == 2 * cfg.rollout.samples_per_prompt and not torch.isnan(res.rolled.rewards).any()
    assert res.probe["logprob_gap_count"] > 0 and res.probe["logprob_gap_max"] < 1e-4  # fp32, the same weights
