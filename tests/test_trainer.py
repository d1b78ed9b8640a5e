"""In-process trainer tests on the toy echo task (tiny random Llama, CPU)."""
import json
import os

import pytest
import torch

from rlkit.config import load_config
from rlkit.data import DataError
from rlkit.trainer import Trainer
from tests.conftest import assert_same_metrics, read_metrics, resume_pair, tiny_overrides

REQUIRED_METRICS = [
    "reward/mean", "reward/echo/mean", "reward/echo/std", "accuracy", "advantage/mean", "advantage/std", "entropy/mean", "clipfrac/mean",
    "response_length/mean", "truncation_rate", "frac_zero_std_groups", "logprob_gap/mean", "logprob_gap/max",
    "time/rollout", "time/reward", "time/train", "time/weight_sync", "time/step", "throughput/tokens_per_s",
    "grad_norm", "loss/policy", "lr",
]


def make(tmp_path, rows, *extra, **kw):
    cfg = load_config(tiny_overrides(tmp_path, **kw) + list(extra))
    return Trainer(cfg, train_rows=rows)


def test_step_logs_every_metric_and_completions(tmp_path, echo_rows):
    tr = make(tmp_path, echo_rows, **{"algorithm.kl.coef": 0.01, "trainer.ppo_epochs": 2})
    tr.train()
    m = read_metrics(tr.run_dir)
    assert [r["step"] for r in m] == [1, 2, 3]
    missing = [k for k in REQUIRED_METRICS + ["kl/mean"] if k not in m[-1]]
    assert not missing, missing
    assert m[0]["logprob_gap/mean"] < 1e-4          # HF engine shares the trainer's weights
    with open(os.path.join(tr.run_dir, "completions.jsonl")) as f:
        comps = [json.loads(l) for l in f]
    assert len(comps) == 3 * 4 * 4 and {"prompt", "completion", "reward", "advantage", "finish_reason"} <= set(comps[0])
    assert os.path.exists(os.path.join(tr.run_dir, "config.yaml"))


def test_resume_matches_uninterrupted(tmp_path, echo_rows):
    a, c, ma, mc = resume_pair(lambda d, **kw: make(d, echo_rows, **{"trainer.total_steps": 4, **kw}), tmp_path)
    ck = os.path.join(c.run_dir, "checkpoints", "step_2")
    assert os.path.exists(os.path.join(ck, "rlkit.pt")) and not os.path.exists(ck + ".tmp")
    assert [r["step"] for r in mc] == [1, 2, 3, 4]
    assert_same_metrics(ma, mc, ("reward/mean", "loss/policy", "grad_norm", "entropy/mean", "response_length/mean", "num_tokens"))
    # the final weights agree too
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        torch.testing.assert_close(p, q)


def test_nonfinite_loss_skips_update(tmp_path, echo_rows, monkeypatch):
    tr = make(tmp_path, echo_rows, **{"trainer.total_steps": 1})
    before = [p.detach().clone() for p in tr.policy.parameters()]
    orig = tr.policy_loss.__call__

    def nan_loss(inp):
        loss, m = orig(inp)
        return loss * float("nan"), m

    monkeypatch.setattr(tr, "policy_loss", nan_loss)
    m = tr.step()
    assert m["train/skipped_nonfinite"] == 1.0
    for p, q in zip(before, tr.policy.parameters()):
        assert torch.equal(p, q)
        assert torch.isfinite(q).all()


def test_reward_exception_is_counted_and_run_continues(tmp_path, echo_rows):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def flaky(completions, **kw):\n    if len(completions) > 0 and completions[0] == completions[0]:\n        raise ValueError('boom')\n")
    tr = make(tmp_path, echo_rows, f"reward.functions=[{tmp_path}/bad_reward.py:flaky,{tr_reward()}]",
              **{"trainer.total_steps": 2})
    tr.train()
    m = read_metrics(tr.run_dir)
    assert len(m) == 2 and m[-1]["reward/flaky/errors"] > 0


def tr_reward():
    from tests.conftest import REPO

    return f"{REPO}/rewards/toy.py:echo"


def test_reward_exception_strict_mode_stops(tmp_path, echo_rows):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def flaky(completions, **kw):\n    raise ValueError('boom')\n")
    tr = make(tmp_path, echo_rows, f"reward.functions=[{tmp_path}/bad_reward.py:flaky]", "reward.strict=true")
    with pytest.raises(RuntimeError, match="flaky"):
        tr.step()


def test_missing_field_names_row_and_field(tmp_path, echo_rows):
    rows = list(echo_rows)
    rows[7] = {"question": "abc:"}  # no answer column
    with pytest.raises(DataError, match=r"row 7: missing answer field 'answer'"):
        make(tmp_path, rows)


def test_dapo_refill_and_gap_check(tmp_path, echo_rows):
    tr = make(tmp_path, echo_rows, "algorithm.filters=[{name: dapo_dynamic_sampling, max_refill_rounds: 2}]",
              **{"trainer.total_steps": 1})
    m = tr.step()
    assert 1 <= m["rollout/rounds"] <= 3
    # a deliberately corrupted engine (stale weights) must stop the run
    import copy

    stale = copy.deepcopy(tr.unwrapped_lm)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(torch.randn_like(p))
    tr.engine.model = stale
    tr.engine.sync_weights = lambda model: None
    with pytest.raises(RuntimeError, match="weight sync"):
        tr.cfg.trainer.ppo_epochs = 2
        tr.score_pass = True
        tr.step()


# tensorboard / wandb (through accelerate): tests/test_trackers.py


def test_truncated_importance_sampling_weights(tmp_path, echo_rows):
    """algorithm.tis_cap: the loss gets min(exp(trainer - rollout log-prob), cap) per token (TIS)."""
    tr = make(tmp_path, echo_rows, "algorithm.tis_cap=2.0", "rollout.max_logprob_gap_error=5.0", **{"trainer.total_steps": 1})
    strategy, seen = tr.strategy, {}

    def shifted(rows, rctx):  # the engine reports log-probs 1.0 below the trainer's at even positions
        b = strategy(rows, rctx)
        even = (torch.arange(b.response_ids.shape[1]) % 2 == 0).float()
        b.rollout_logprobs = b.rollout_logprobs - even[None, :] * b.response_mask
        return b

    loss_fn = tr.policy_loss

    def spy(inp):
        seen["w"], seen["mask"] = inp.rollout_is_weights.detach(), inp.mask.detach()
        return loss_fn(inp)

    shifted.metrics = strategy.metrics
    tr.strategy, tr.policy_loss = shifted, spy
    tr.step()
    w, m = seen["w"], seen["mask"] > 0
    even = (torch.arange(w.shape[1]) % 2 == 0)[None, :] & m
    odd = (torch.arange(w.shape[1]) % 2 == 1)[None, :] & m
    torch.testing.assert_close(w[even], torch.full_like(w[even], 2.0))          # exp(1) = 2.718, capped at 2
    torch.testing.assert_close(w[odd], torch.ones_like(w[odd]), atol=1e-4, rtol=0)
    assert (w[~m] == 0).all()
