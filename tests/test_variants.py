"""Trainer variants on the toy task: PPO with a GAE critic, LoRA (+ KL against the
adapter-free base), GSPO, Dr.GRPO aggregation, KL in the reward, several mini-batches."""
import json
import os

import pytest
import torch

from rlkit.config import load_config
from rlkit.trainer import Trainer
from tests.conftest import tiny_overrides


def run(tmp_path, rows, *extra, **kw):
    cfg = load_config(tiny_overrides(tmp_path, **kw) + list(extra))
    tr = Trainer(cfg, train_rows=rows)
    tr.train()
    with open(os.path.join(tr.run_dir, "metrics.jsonl")) as f:
        return tr, [json.loads(l) for l in f]


def test_ppo_gae_critic(tmp_path, echo_rows):
    tr, m = run(tmp_path, echo_rows, **{"algorithm.advantage": "gae", "trainer.ppo_epochs": 2,
                                        "trainer.samples_per_minibatch": 8})
    assert tr.critic is not None
    assert all(torch.isfinite(torch.tensor(r["loss/value"])) for r in m)
    # the critic head moves (it starts at exactly zero)
    head = tr.acc.unwrap_model(tr.critic).v_head
    assert head.weight.abs().sum() > 0


def test_lora_with_kl_uses_adapter_free_reference(tmp_path, echo_rows):
    tr, m = run(tmp_path, echo_rows, **{"model.lora.enabled": "true", "model.lora.r": 4, "algorithm.kl.coef": 0.05,
                                        "trainer.lr": 5e-2})
    assert tr.ref is None  # no second model: the reference is the base with adapters off
    assert m[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero
    assert m[-1]["kl/mean"] > 0
    # merged HF checkpoint loads with plain from_pretrained and differs from the base
    out = tmp_path / "merged"
    tr.save_model(str(out))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())


@pytest.mark.parametrize("extra", [
    {"algorithm.policy_loss": "gspo", "algorithm.aggregation": "seq_mean_token_mean"},
    {"algorithm.advantage.scale_by_std": "false", "algorithm.aggregation": "seq_mean_token_sum_norm"},
    {"algorithm.kl.coef": 0.01, "algorithm.kl.placement": "reward", "algorithm.advantage": "reinforce_pp"},
    {"algorithm.policy_loss.dual_clip": 3.0, "algorithm.aggregation": "token_mean", "algorithm.entropy_coef": 0.01,
     "trainer.tokens_per_microbatch": 16},
])
def test_objective_variants_train(tmp_path, echo_rows, extra):
    tr, m = run(tmp_path, echo_rows, **extra, **{"trainer.total_steps": 2})
    assert len(m) == 2
    assert all(v is None or isinstance(v, (int, float)) for v in m[-1].values())
    assert m[-1]["grad_norm"] > 0 and m[-1]["grad_norm"] == m[-1]["grad_norm"]


def test_microbatch_split_matches_single_batch(tmp_path, echo_rows):
    """Token-budgeted micro-batches + global normalisers give the same update as one big batch."""
    # (parameters are not compared: Adam turns float-rounding differences in ~0 gradients into +-lr steps)
    _, ma = run(tmp_path / "a", echo_rows, **{"trainer.total_steps": 1, "trainer.tokens_per_microbatch": 100000})
    _, mb = run(tmp_path / "b", echo_rows, **{"trainer.total_steps": 1, "trainer.tokens_per_microbatch": 12})
    assert ma[0]["reward/mean"] == mb[0]["reward/mean"]
    assert mb[0]["grad_norm"] == pytest.approx(ma[0]["grad_norm"], rel=1e-4)
    assert mb[0]["loss/policy"] == pytest.approx(ma[0]["loss/policy"], rel=1e-3, abs=1e-7)
