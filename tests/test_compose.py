"""Composition of TEMPO and D³S with the trainer, in process and launched the way users launch."""
import json
import math
import os

import pytest

from rlkit.algorithms.d3s import D3SSamples, D3STokens
from rlkit.config import load_config
from rlkit.registry import CONTROLLERS, FILTERS, ROLLOUT_STRATEGIES
from rlkit.trainer import Trainer
from tests.conftest import REPO, launch_recipe, tiny_overrides

REPO_TESTS = REPO / "tests"

D3S = ["algorithm.filters=[{name: d3s_samples, keep: 0.5}]",
       "algorithm.token_weighting=[{name: d3s_tokens, top_frac: 0.2}]",
       "algorithm.controllers=[{name: d3s_schedule, samples_final: 1.0, tokens_final: 1.0}]"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_finite(rows):
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (r["step"], bad)


def _uec_overrides():
    """The UEC entropy-band controller (docs/methods/uec.md) drives EFRame's exploration and replay."""
    assert "uec" in CONTROLLERS and "eframe_filter" in FILTERS and "eframe" in ROLLOUT_STRATEGIES
    return ["rollout.strategy={name: eframe, explore_samples: 4}",
            "algorithm.filters=[{name: eframe_filter}, {name: d3s_samples, keep: 0.5}]",
            "algorithm.token_weighting=[{name: d3s_tokens, top_frac: 0.2}]",
            "algorithm.controllers=[{name: d3s_schedule}, {name: uec, probe_samples: 4}]"]


@pytest.mark.parametrize("variant", ["tempo+ppo_clip", "grpo+gspo", "tempo+uec"])
def test_tempo_d3s_schedule_in_process(tmp_path, echo_rows, variant):
    adv, extra = variant.split("+")
    over = ["algorithm.advantage=" + adv]
    over += _uec_overrides() if extra == "uec" else D3S + ["algorithm.policy_loss=" + extra]
    total = 4
    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": total}) + over)
    tr = Trainer(cfg, train_rows=echo_rows)
    assert "entropy" in tr.needs and tr.score_pass                # d3s_tokens reads the scoring pass's entropy
    sampler = next(f for f in tr.post_filters if isinstance(f, D3SSamples))
    weighting = next(w for w in tr.token_weighting if isinstance(w, D3STokens))
    tr.train()
    m = read_metrics(tr.run_dir)
    assert [r["step"] for r in m] == list(range(1, total + 1))
    check_finite(m)
    if extra != "uec":
        assert all("loss/policy" in r and "d3s/kept_samples" in r for r in m)
        assert m[0]["d3s/keep"] == 0.5 and m[0]["train/kept_token_frac"] < 0.3      # ceil(0.2 x count)
        assert m[0]["train/samples"] <= 8                         # <= half of 4 prompts x 4 samples
    # the schedule reached the relaxed end: step 4 of 4 runs with everything
    assert sampler.params.keep == pytest.approx(1.0) and weighting.params.top_frac == pytest.approx(1.0)
    assert m[-1]["d3s/schedule_progress"] == 1.0


def test_schedule_survives_resume(tmp_path, echo_rows):
    over = ["algorithm.advantage=tempo"] + D3S
    from tests.conftest import assert_same_metrics, resume_pair

    def make(d, **kw):
        return Trainer(load_config(tiny_overrides(d, **{"trainer.total_steps": 4, **kw}) + over), train_rows=echo_rows)

    _, _, ma, mc = resume_pair(make, tmp_path)
    assert_same_metrics(ma, mc, ("d3s/keep", "d3s/kept_samples", "train/kept_token_frac", "reward/mean", "loss/policy"))


# ------------------------------------------------------------- end to end
@pytest.mark.parametrize("recipe", ["grpo_tempo", "grpo_d3s", "grpo_tempo_d3s"])
def test_recipe_tiny_profile_reward_rises(tmp_path, recipe, toy_model_dir):
    m, _ = launch_recipe(recipe, tmp_path, timeout=900)
    assert [r["step"] for r in m] == list(range(1, 21))
    check_finite(m)
    r = [x["reward/mean"] for x in m]
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.04 and last > 2 * first, r


def test_tempo_d3s_uec_recipe_tiny(tmp_path, toy_model_dir):
    """TEMPO + D³S + UEC in one recipe, launched as users launch it."""
    m, run = launch_recipe("tempo_d3s_uec", tmp_path)
    assert [r["step"] for r in m] == list(range(1, 31))
    cfg = (run / "config.yaml").read_text()
    assert "advantage: tempo" in cfg and "d3s_samples" in cfg and "name: uec" in cfg
    for k in ("uec/entropy_before_update", "d3s/keep", "eframe/main_reward_mean", "advantage/mean"):
        assert any(k in r for r in m), k
    r = [x["eframe/main_reward_mean"] for x in m if x.get("eframe/main_reward_mean") is not None]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4, r


# ------------------------------------------------------------- mechanism test (issue 10)
def test_tempo_tree_credit_and_d3s_selection_act_in_training(tmp_path, echo_rows, monkeypatch):
    """Trainer-level: TEMPO's advantages are the tree credit (not GRPO's) on rows that share prefixes, and D³S
    trains only the selected samples and tokens, following its schedule.  Catches (docs/methods/tempo.md, d3s.md):
    TEMPO's TD term dropped (advantage = GRPO), D³S keeping every sample, D³S keeping every token, a frozen
    schedule."""
    from rlkit.algorithms.tempo import TEMPO
    from tests.test_tempo import reference

    seen = []
    orig = TEMPO.__call__

    def spy(self, batch):
        orig(self, batch)
        m = batch.response_mask.bool()
        seen.append(([batch.response_ids[i][m[i]].tolist() for i in range(len(batch))], batch.rewards.tolist(),
                     batch.group_ids.tolist(), batch.advantages.clone()))

    monkeypatch.setattr(TEMPO, "__call__", spy)
    reward = str(REPO_TESTS / "mechanism_rewards.py") + ":first_early"
    total = 3
    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": total, "reward.functions": f"[{reward}]"})
                      + ["algorithm.advantage=tempo"] + D3S)
    tr = Trainer(cfg, train_rows=echo_rows)
    tr.train()
    m = read_metrics(tr.run_dir)
    assert len(seen) == total
    tree_rows = 0
    for seqs, R, G, adv in seen:
        ref, grpo = reference(seqs, R, G), reference(seqs, R, G, td_coef=0.0)
        for i, s in enumerate(seqs):
            torch_adv = adv[i, :len(s)].double()
            assert torch_adv.tolist() == pytest.approx(ref[i, :len(s)].tolist(), abs=1e-4)
            if (torch_adv - grpo[i, :len(s)]).abs().max() > 1e-3:
                tree_rows += 1
    assert tree_rows >= 4, tree_rows            # the TD term acts on many rows, not by accident on one
    # D³S: keep / top_frac follow the schedule; the trainer trains exactly the kept samples and ~top_frac tokens
    S = 4 * 4
    trained = 0
    for t, r in enumerate(m):
        keep, top = 0.5 + 0.5 * t / (total - 1), 0.2 + 0.8 * t / (total - 1)
        assert r["d3s/keep"] == pytest.approx(keep) and r["d3s/top_frac"] == pytest.approx(top)
        if "train/samples" not in r:      # no row with signal this step
            continue
        trained += 1
        assert r["train/samples"] == r["d3s/kept_samples"] <= math.floor(keep * S + 0.5)
        assert r["train/kept_token_frac"] == pytest.approx(r["d3s/kept_token_frac"])
        assert r["train/kept_token_frac"] <= top + 0.1
    assert trained >= 2 and m[0]["train/samples"] <= S // 2 and m[0]["train/kept_token_frac"] < 0.3
