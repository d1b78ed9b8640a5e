"""PCL prompt selector: spec A 4.5 worked example, value-model update, distributed merge,
resume, and an end-to-end tiny run launched the way users launch."""

import pytest
import torch

from rlkit.algorithms.pcl import PCLSelector, explained_variance, select_closest, value_loss
from rlkit.batch import Batch
from rlkit.plugins import PluginContext
from tests.conftest import launch_recipe, tiny_overrides

V = [0.10, 0.45, 0.90, 0.55, 0.30, 0.50, 0.00, 0.62]


# ------------------------------------------------------------ spec 4.5
def test_worked_example_selection_and_value_loss():
    assert select_closest(V, 3, tau=0.5) == [5, 1, 3]          # tie 1 vs 3 broken by index
    assert select_closest(list(reversed(V)), 3, tau=0.5) == [2, 4, 6]
    pred = torch.tensor([0.50, 0.45, 0.55])                     # V of prompts [5, 1, 3]
    emp = torch.tensor([0.75, 0.25, 0.50])                      # empirical success of their n = 4 rollouts
    assert value_loss(pred, emp, "sum").item() == pytest.approx(0.105)
    assert value_loss(pred, emp, "mean").item() == pytest.approx(0.035)
    # the paper's policy objective for prompt 5 (rewards [1,1,1,0]): GRPO without std
    from rlkit.objectives.grpo import GRPO

    b = Batch(prompt_ids=[[1]] * 4, response_ids=torch.ones(4, 2, dtype=torch.long), response_mask=torch.ones(4, 2),
              group_ids=torch.zeros(4, dtype=torch.long), rewards=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    GRPO(GRPO.Params(scale_by_std=False))(b)
    assert b.advantages[:, 0].tolist() == pytest.approx([0.25, 0.25, 0.25, -0.75])


def test_explained_variance():
    y = torch.tensor([0.0, 0.5, 1.0])
    assert explained_variance(y, y) == pytest.approx(1.0)
    assert explained_variance(torch.full((3,), 0.5), y) == pytest.approx(0.0)
    assert explained_variance(y, torch.ones(3)) != explained_variance(y, torch.ones(3))  # NaN: constant targets


# ------------------------------------------------------------ the selector
def _rows(n=8):
    return [{"prompt": f"abc{chr(97 + i)}:", "prompt_ids": [1, 5, 6, 7, 8 + i], "answer": chr(97 + i)} for i in range(n)]


def _selector(toy_model_dir, world_size=1, **kw):
    from transformers import AutoModel

    torch.manual_seed(0)
    sel = PCLSelector(PCLSelector.Params(**kw), PluginContext(seed=3, world_size=world_size))
    sel.bind(_rows())
    sel.build_value_model(backbone=AutoModel.from_pretrained(toy_model_dir))
    return sel


def _batch(rows_idx, rewards, rows):
    n = len(rows_idx)
    return Batch(prompt_ids=[rows[i]["prompt_ids"] for i in rows_idx], response_ids=torch.ones(n, 2, dtype=torch.long),
                 response_mask=torch.ones(n, 2), group_ids=torch.tensor(rows_idx), rewards=torch.tensor(rewards),
                 info={"prompt": [rows[i]["prompt"] for i in rows_idx]})


def test_select_uses_predictions_pool_and_ties(toy_model_dir, monkeypatch):
    sel = _selector(toy_model_dir, k=4)
    monkeypatch.setattr(sel, "predict", lambda idx: torch.tensor(V[:len(idx)]))
    twin = PCLSelector(PCLSelector.Params(k=4), PluginContext(seed=3))
    twin.bind(_rows())
    pool = twin._draw_pool(8)
    chosen = sel.select(1, 3)                                   # pool = min(4 x 3, 8) = every row, shuffled
    assert chosen == [pool[5], pool[1], pool[3]]
    assert sel.draws == 1
    # a fresh value model predicts tau everywhere: the first m of the (uniform) pool
    sel2 = _selector(toy_model_dir, k=2)
    p = sel2.predict(list(range(8)))
    assert torch.allclose(p, torch.full((8,), 0.5))


@pytest.mark.parametrize("mode", ["frozen_base", "separate"])
def test_update_fits_empirical_means(toy_model_dir, mode):
    sel = _selector(toy_model_dir, mode=mode, head_lr=0.01, lr=1e-3, k=1)
    rows = sel.dataset
    sel.select(1, 4)
    # prompts 0..3; two samples each (group ids = prompt index); prompt 3 also has a NaN (skipped) sample
    idx = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    r = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, float("nan")]
    before = sel.predict([0, 1, 2, 3])
    m = sel.update(_batch(idx, r, rows))
    target = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert m["pcl/value_loss"] == pytest.approx(((before - target) ** 2).mean().item(), rel=1e-5)
    assert m["pcl/selected_empirical"] == pytest.approx(0.5)
    assert m["pcl/selected_pred"] == pytest.approx(before.mean().item(), rel=1e-5)
    assert m["pcl/num_prompts"] == 4
    for k in ("pcl/explained_variance", "pcl/pool_pred_mean", "pcl/selected_dist_to_tau", "pcl/update_time_s"):
        assert k in m, k
    for _ in range(40):
        sel.update(_batch(idx, r, rows))
    after = sel.predict([0, 1, 2, 3])
    assert ((after - target) ** 2).mean() < 0.05 * ((before - target) ** 2).mean()
    assert after[0] > after[2] > after[1]
    if mode == "frozen_base":  # only the head trains
        assert all(not q.requires_grad for q in sel.vm.backbone.parameters())


def test_update_with_empty_batch_and_reward_key(toy_model_dir):
    sel = _selector(toy_model_dir, mode="frozen_base", reward_key="acc")
    empty = Batch(prompt_ids=[], response_ids=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1),
                  group_ids=torch.zeros(0, dtype=torch.long))
    assert "pcl/value_loss" not in sel.update(empty)
    b = _batch([0, 0], [5.0, 5.0], sel.dataset)
    b.reward_components = {"acc": torch.tensor([1.0, 0.0])}
    assert sel.update(b)["pcl/selected_empirical"] == pytest.approx(0.5)   # the component, not the total reward


def test_distributed_gather_gives_every_rank_the_global_update(toy_model_dir, monkeypatch):
    """Two ranks, each with half the groups: after gathering both make the update a single process makes."""
    import accelerate.utils

    single = _selector(toy_model_dir, mode="frozen_base", head_lr=0.05)
    rows = single.dataset
    full = _batch([0, 0, 1, 1, 2, 2], [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], rows)
    rank0, rank1 = _batch([0, 0, 1], [1.0, 1.0, 0.0], rows), _batch([1, 2, 2], [1.0, 0.0, 0.0], rows)
    m_single = single.update(full)

    ranks = [_selector(toy_model_dir, world_size=2, mode="frozen_base", head_lr=0.05) for _ in range(2)]
    local = [ranks[0]._targets(rank0), ranks[1]._targets(rank1)]
    gathered = [(i, s, c) for d in local for i, (s, c) in sorted(d.items())]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: gathered)
    outs = [ranks[0].update(rank0), ranks[1].update(rank1)]
    for sel, m in zip(ranks, outs):
        assert m["pcl/value_loss"] == pytest.approx(m_single["pcl/value_loss"])
        assert m["pcl/selected_empirical"] == pytest.approx(m_single["pcl/selected_empirical"])
        for p, q in zip(sel.vm.head.parameters(), single.vm.head.parameters()):
            torch.testing.assert_close(p, q)


def test_state_dict_roundtrip(toy_model_dir):
    a = _selector(toy_model_dir, mode="separate", head_lr=0.05, lr=1e-3)
    rows = a.dataset
    a.select(1, 2)
    a.update(_batch([0, 0, 1, 1], [1.0, 1.0, 0.0, 0.0], rows))
    state = a.state_dict()
    assert {"draws", "head", "backbone", "optimizer"} <= set(state)
    b = PCLSelector(PCLSelector.Params(mode="separate", head_lr=0.05, lr=1e-3), PluginContext(seed=3))
    b.bind(rows)
    b.load_state_dict(state)                                    # before the model exists: applied when built
    from transformers import AutoModel

    b.build_value_model(backbone=AutoModel.from_pretrained(toy_model_dir))
    torch.testing.assert_close(a.predict(list(range(8))), b.predict(list(range(8))))
    assert a.select(2, 3) == b.select(2, 3)                     # same RNG position, same predictions
    ba, bb = _batch([2, 2], [1.0, 0.0], rows), _batch([2, 2], [1.0, 0.0], rows)
    a.update(ba), b.update(bb)                                  # the optimizer state came along too
    torch.testing.assert_close(a.predict(list(range(8))), b.predict(list(range(8))))


# ------------------------------------------------------------ in the trainer
def test_trainer_resume_matches_uninterrupted(tmp_path, echo_rows):
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    sel = "algorithm.prompt_selector={name: pcl, mode: separate, k: 2, head_lr: 0.01}"

    def make(d, **kw):
        return Trainer(load_config(tiny_overrides(d, **{"trainer.total_steps": 4, **kw}) + [sel]), train_rows=echo_rows)

    from tests.conftest import assert_same_metrics, resume_pair

    a, c, ma, mc = resume_pair(make, tmp_path)
    assert_same_metrics(ma, mc, ("reward/mean", "pcl/value_loss", "pcl/selected_pred", "pcl/pool_pred_mean", "loss/policy"))
    for p, q in zip(a.selector.vm.parameters(), c.selector.vm.parameters()):
        torch.testing.assert_close(p, q)


def test_e2e_tiny_recipe(tmp_path, toy_model_dir):
    m, _ = launch_recipe("grpo_pcl", tmp_path)
    assert len(m) == 24
    for k in ("pcl/explained_variance", "pcl/value_loss", "pcl/selected_pred", "pcl/selected_empirical",
              "pcl/pool_pred_mean", "pcl/selected_dist_to_tau"):
        assert all(k in r for r in m[1:]), k
    r = [x["reward/mean"] for x in m]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4, r
    # the value model learns: its predictions move from tau = 0.5 towards the (low) empirical success
    assert m[-1]["pcl/selected_pred"] < m[0]["pcl/selected_pred"]


# ------------------------------------------------------------ mechanism (trainer-level)
def _tiers_trainer(tmp_path, *extra):
    """``recipes/grpo_pcl.yaml profile=tiers`` in-process (rewards/tiers.py: p = 1 / 0 / 0.5 prompts)."""
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import REPO

    cfg = load_config([f"recipe={REPO}/recipes/grpo_pcl.yaml", "profile=tiers", f"data.path={REPO}/recipes/data/tiers_train.jsonl",
                       f"reward.functions=[{REPO}/rewards/tiers.py:tier_reward]", f"trainer.output_dir={tmp_path}", *extra])
    return Trainer(cfg)


def test_mechanism_curriculum_on_prompts_of_different_difficulty(tmp_path):
    """rewards/tiers.py: a quarter of the prompts succeed half the time, the rest always (p = 1) or never (p = 0).
    PCL's value model must learn p(x) from the prompt (explained variance over every prompt vs. its true success
    rate), and selection must concentrate on the p = 0.5 prompts (tau).  Fails when selection ignores the value
    model (random selection: a quarter of the chosen prompts are medium, empirical distance to tau ~0.4) and when
    the head's features are not standardised across prompts (a per-sample LayerNorm: the head learns a bias)."""
    from rewards.tiers import SUCCESS

    tr = _tiers_trainer(tmp_path)
    assert tr.cfg.trainer.total_steps == 16
    chosen = []
    orig = tr.selector.select
    tr.selector.select = lambda step, n: (lambda out: (chosen.append(out), out)[1])(orig(step, n))
    ms = [tr.step() for _ in range(16)]
    tiers = [r["tier"] for r in tr.train_rows]
    late = [i for ids in chosen[8:] for i in ids]
    mid_frac = sum(tiers[i] == "mid" for i in late) / len(late)
    dist = sum(m["pcl/empirical_dist_to_tau"] for m in ms[8:]) / 8
    pred = tr.selector.predict(list(range(len(tiers))))
    p = torch.tensor([SUCCESS[t] for t in tiers])
    ev = explained_variance(pred, p)
    assert ev > 0.5, (ev, pred.std())
    assert mid_frac > 0.5 and dist < 0.3, (mid_frac, dist)          # uniform: 0.25 and ~0.41
    means = {t: float(pred[[i for i, x in enumerate(tiers) if x == t]].mean()) for t in SUCCESS}
    assert means["hard"] < means["mid"] < means["easy"], means


def test_row_ids_survive_prompt_rewrites(tmp_path, echo_rows):
    """The length-budget controller rewrites every prompt after bind(); PCL keys prompts by row_id, so the value
    model still learns (before: no pcl/value_loss, predictions stuck at exactly tau)."""
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import REPO

    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 2, "reward.functions":
                                                  f"[{REPO}/rewards/toy.py:echo, length_budget]"}) + [
        "algorithm.prompt_selector={name: pcl, mode: frozen_base, k: 2, head_lr: 0.01}",
        "algorithm.controllers=[{name: length_budget, initial_budget: 6, period: 1, prompt_template: '{prompt}={budget}'}]"])
    tr = Trainer(cfg, train_rows=echo_rows)
    assert [r["row_id"] for r in tr.train_rows] == list(range(len(tr.train_rows)))
    ms = [tr.step() for _ in range(2)]
    assert tr.train_rows[0]["prompt"].endswith("=4")                   # rewritten (budget 6 -> 4)
    assert all("pcl/value_loss" in m and "pcl/unmatched_rows" not in m for m in ms)
    assert ms[1]["pcl/pool_pred_std"] > 0
