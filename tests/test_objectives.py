"""Objective plugins against the hand-computed worked examples of
spec B, Sec. 5.7 (exploration_distill_baselines.md)."""
import math

import pytest
import torch

import rlkit.objectives  # noqa: F401  (registers everything)
from rlkit.batch import Batch
from rlkit.objectives.aggregation import (make_norm, seq_mean_token_mean, seq_mean_token_sum,
                                          seq_mean_token_sum_norm, token_mean)
from rlkit.objectives.dapo import DAPODynamicSampling
from rlkit.objectives.entropy import EntropyBonus
from rlkit.objectives.gae import GAE, gae_advantages, value_loss
from rlkit.objectives.grpo import GRPO
from rlkit.objectives.gspo import GSPO
from rlkit.objectives.kl import abs_kl, k1, k2, k3, k3_straight_through, kl_loss_term
from rlkit.objectives.ppo_clip import PPOClip
from rlkit.objectives.reinforce_pp import ReinforcePP
from rlkit.objectives.rloo import RLOO
from rlkit.plugins import ForwardOutput, LossInputs
from rlkit import registry

AGGS = [token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm]


def make_batch(rewards, lengths, group_ids=None, T=None, **kw):
    S = len(rewards)
    T = T or max(max(lengths), 1)
    mask = torch.zeros(S, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Batch(
        prompt_ids=[[1, 2]] * S,
        response_ids=torch.ones(S, T, dtype=torch.long) * mask.long(),
        response_mask=mask,
        group_ids=torch.as_tensor(group_ids if group_ids is not None else [0] * S),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        **kw,
    )


def row_adv(batch):
    """first-token advantage per row"""
    return batch.advantages[:, 0]


# ------------------------------------------------------------------ registry
def test_registration():
    assert registry.ADVANTAGES._items["grpo"] is GRPO
    assert registry.ADVANTAGES._items["rloo"] is RLOO
    assert registry.ADVANTAGES._items["reinforce_pp"] is ReinforcePP
    assert registry.ADVANTAGES._items["gae"] is GAE
    assert registry.POLICY_LOSSES._items["ppo_clip"] is PPOClip
    assert registry.POLICY_LOSSES._items["gspo"] is GSPO
    assert registry.AGGREGATIONS._items["token_mean"] is token_mean
    assert registry.AGGREGATIONS._items["seq_mean_token_sum_norm"] is seq_mean_token_sum_norm
    for n in ("k1", "k2", "k3", "abs", "low_var_kl"):
        assert n in registry.KL_ESTIMATORS._items
    assert registry.REGULARIZERS._items["entropy_bonus"] is EntropyBonus
    assert registry.FILTERS._items["dapo_dynamic_sampling"] is DAPODynamicSampling
    assert GAE.needs_critic and GAE.needs == frozenset({"values"})
    assert EntropyBonus.needs == frozenset({"entropy"})


# ----------------------------------------------------------------- GRPO etc.
R4 = [1.0, 0.0, 0.0, 1.0]
L4 = [3, 1, 2, 3]


@pytest.mark.parametrize("params,expected", [
    (GRPO.Params(), 0.866024),                               # verl eps 1e-6
    (GRPO.Params(eps=1e-4), 0.865875),                       # TRL eps 1e-4
    (GRPO.Params(eps=1e-4, std_scope="batch"), 0.865875),    # one group: batch std == group std
    (GRPO.Params(scale_by_std=False), 0.5),                  # Dr.GRPO
])
def test_grpo_worked_example(params, expected):
    b = make_batch(R4, L4, T=5)
    GRPO(params)(b)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.allclose(row_adv(b), sign * expected, atol=1e-5)
    # broadcast over the mask, exactly zero on padding
    assert torch.allclose(b.advantages, (sign * expected)[:, None] * b.response_mask, atol=1e-5)
    assert torch.equal(b.advantages[b.response_mask == 0], torch.zeros(int((b.response_mask == 0).sum())))
    assert b.advantages.dtype == torch.float32
    assert torch.equal(b.returns, b.advantages)


def test_grpo_batch_scope_uses_batch_std():
    # group 0: [1,0], group 1: [3,3]; batch std (unbiased) of [1,0,3,3] = sqrt(6.75/3) = 1.5
    b = make_batch([1.0, 0.0, 3.0, 3.0], [1, 1, 1, 1], group_ids=[0, 0, 1, 1])
    GRPO(GRPO.Params(eps=1e-4, std_scope="batch"))(b)
    exp = 0.5 / (1.5 + 1e-4)
    assert torch.allclose(row_adv(b), torch.tensor([exp, -exp, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(row_adv(b)[2:], torch.zeros(2))


def test_rloo_worked_example():
    b = make_batch(R4, L4)
    RLOO()(b)
    assert torch.allclose(row_adv(b), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]), atol=1e-5)
    assert abs(row_adv(b)[0].item() - 0.666667) < 1e-5


@pytest.mark.parametrize("est", [GRPO(), GRPO(GRPO.Params(scale_by_std=False)), GRPO(GRPO.Params(std_scope="batch")),
                                 RLOO(), ReinforcePP(ReinforcePP.Params(baseline="group_mean"))])
def test_identical_rewards_exact_zero(est):
    # 0.1 three times: mean has float residue, the guard must still give exact 0
    b = make_batch([0.1, 0.1, 0.1, 0.7, 0.7], [2, 3, 1, 2, 2], group_ids=[5, 5, 5, 9, 9])
    est(b)
    assert torch.equal(b.advantages, torch.zeros_like(b.advantages))


def test_singleton_group_zero():
    b = make_batch([1.0, 0.0, 1.0, 0.7], [2, 2, 2, 2], group_ids=[0, 0, 0, 1])
    GRPO()(b)
    assert row_adv(b)[3].item() == 0.0
    assert abs(row_adv(b)[0].item() - (1 / 3) / (math.sqrt(1 / 3) + 1e-6)) < 1e-5
    RLOO()(b)
    assert row_adv(b)[3].item() == 0.0
    assert abs(row_adv(b)[0].item() - 0.5) < 1e-6   # 1 - mean(0, 1)


@pytest.mark.parametrize("est,expected", [(GRPO(), 0.866024), (RLOO(), 2 / 3)])
def test_nan_reward_excluded(est, expected):
    b = make_batch([1.0, float("nan"), 0.0, 0.0, 1.0], [2, 2, 2, 2, 2])
    est(b)
    a = row_adv(b)
    assert a[1].item() == 0.0
    assert torch.equal(b.advantages[1], torch.zeros(2))
    assert torch.allclose(a[[0, 2, 3, 4]], torch.tensor([1.0, -1.0, -1.0, 1.0]) * expected, atol=1e-5)
    assert not torch.isnan(b.advantages).any()


def test_token_rewards_sum_used_as_outcome():
    # token rewards sum per row: [1, 0, 0, 1] (KL-in-reward style split over tokens)
    tr = torch.tensor([[0.25, 0.75, 9.0], [0.1, -0.1, 9.0], [0.0, 0.0, 0.0], [1.0, 0.0, 9.0]])
    b = make_batch([7.0, 7.0, 7.0, 7.0], [2, 2, 1, 2], T=3, token_rewards=tr)
    GRPO()(b)
    assert torch.allclose(row_adv(b), torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.866024, atol=1e-5)


# -------------------------------------------------------------- REINFORCE++
def test_reinforce_pp_worked_example():
    b = make_batch([1.0, 0.0], [2, 2], group_ids=[0, 1], T=3)
    ReinforcePP()(b)
    exp = torch.tensor([[0.866025, 0.866025, 0.0], [-0.866025, -0.866025, 0.0]])
    assert torch.allclose(b.advantages, exp, atol=1e-5)
    assert torch.allclose(b.returns, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_reinforce_pp_gamma_and_baseline():
    # gamma 0.5, one row of length 3 reward 1 -> returns [0.25, 0.5, 1]; second row len 1 reward 0
    b = make_batch([1.0, 0.0], [3, 1], group_ids=[0, 0], T=4)
    ReinforcePP(ReinforcePP.Params(gamma=0.5))(b)
    assert torch.allclose(b.returns, torch.tensor([[0.25, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.tensor([0.25, 0.5, 1.0, 0.0])
    w = (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)
    assert torch.allclose(b.advantages[0, :3], w[:3], atol=1e-5)
    assert abs(b.advantages[1, 0].item() - w[3].item()) < 1e-5
    assert torch.equal(b.advantages[1, 1:], torch.zeros(3))
    # baseline mode: group mean subtracted, then whitened: [+.5,+.5,-.5,-.5] -> +-0.866025
    b = make_batch([1.0, 0.0], [2, 2], group_ids=[0, 0])
    ReinforcePP(ReinforcePP.Params(baseline="group_mean"))(b)
    assert torch.allclose(b.advantages, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) * 0.866025, atol=1e-5)


def test_reinforce_pp_all_identical_exact_zero():
    # gamma 1: every valid token return equals 0.3 -> whitening guard gives exact 0
    for params in (ReinforcePP.Params(), ReinforcePP.Params(baseline="group_mean")):
        b = make_batch([0.3, 0.3, 0.3], [2, 3, 1], group_ids=[0, 1, 1], T=4)
        ReinforcePP(params)(b)
        assert torch.equal(b.advantages, torch.zeros_like(b.advantages))


def test_reinforce_pp_token_rewards():
    # KL-in-reward style token rewards, gamma 1: returns are suffix sums
    tr = torch.tensor([[0.0, -0.1, 1.0], [-0.2, 0.0, 5.0]])
    b = make_batch([1.0, 0.0], [3, 2], group_ids=[0, 1], token_rewards=tr)
    ReinforcePP()(b)
    assert torch.allclose(b.returns, torch.tensor([[0.9, 0.9, 1.0], [-0.2, 0.0, 0.0]]), atol=1e-6)
    x = torch.tensor([0.9, 0.9, 1.0, -0.2, 0.0], dtype=torch.float64)
    w = ((x - x.mean()) / torch.sqrt(x.var() + 1e-8)).float()
    assert torch.allclose(b.advantages[0], w[:3], atol=1e-6)
    assert torch.allclose(b.advantages[1, :2], w[3:], atol=1e-6) and b.advantages[1, 2].item() == 0.0


# ---------------------------------------------------------------------- GAE
def test_gae_worked_example():
    V = torch.tensor([[0.5, 0.6, 0.8, 123.0]])      # garbage in padding
    r, m = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([[1, 1, 1, 0]]).bool()
    adv, ret = gae_advantages(r, V, m, gamma=1.0, lam=0.95)
    assert torch.allclose(adv.float(), torch.tensor([[0.4705, 0.39, 0.2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret.float(), torch.tensor([[0.9705, 0.99, 1.0, 0.0]]), atol=1e-6)
    # through the plugin: reward placed on the last valid token, then whitened
    b = make_batch([1.0], [3], T=4, values=V)
    GAE(GAE.Params(gamma=1.0, lam=0.95))(b)
    assert torch.allclose(b.advantages, torch.tensor([[0.842364, 0.262789, -1.105153, 0.0]]), atol=1e-5)
    assert torch.allclose(b.returns, torch.tensor([[0.9705, 0.99, 1.0, 0.0]]), atol=1e-6)
    b = make_batch([1.0], [3], T=4, values=V)
    GAE(GAE.Params(gamma=1.0, lam=0.95, whiten=False))(b)
    assert torch.allclose(b.advantages, torch.tensor([[0.4705, 0.39, 0.2, 0.0]]), atol=1e-6)


def test_gae_needs_values_and_nan_row():
    b = make_batch([1.0], [3])
    with pytest.raises(ValueError, match="values"):
        GAE()(b)
    V = torch.tensor([[0.5, 0.6, 0.8], [0.1, 0.2, 0.3]])
    b = make_batch([1.0, float("nan")], [3, 3], values=V)
    GAE(GAE.Params(lam=0.95))(b)
    assert torch.equal(b.advantages[1], torch.zeros(3))
    assert torch.allclose(b.returns[1], V[1])
    assert torch.allclose(b.advantages[0], torch.tensor([0.842364, 0.262789, -1.105153]), atol=1e-5)


def test_value_loss_clip():
    V, Vold, R = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1.2, 1.2]])
    out = value_loss(V, Vold, R, torch.tensor([[1.0, 0.0]]), cliprange_value=0.2)
    assert torch.allclose(out, torch.tensor([[0.125, 0.0]]), atol=1e-7)
    # unclipped: |V - Vold| < c -> 0.5 (V-R)^2
    out = value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert abs(out.item() - 0.08) < 1e-6


# ----------------------------------------------------------------- PPO clip
def ppo_inputs(log_ratio, A, mask=None):
    logp = torch.tensor([log_ratio], requires_grad=True)
    old = torch.zeros(1, len(log_ratio))
    adv = torch.tensor([A])
    mask = torch.ones_like(old) if mask is None else torch.tensor([mask])
    return logp, LossInputs(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask)


def test_ppo_clip_worked_examples():
    logp, inp = ppo_inputs([0.3], [1.0])
    loss, met = PPOClip()(inp)
    assert abs(loss.item() - (-1.2)) < 1e-6
    assert met["clipfrac"].item() == 1.0
    assert abs(met["ratio"].item() - 1.349859) < 1e-6
    assert abs(met["ppo_kl"].item() - (-0.3)) < 1e-6
    loss.sum().backward()
    assert logp.grad.item() == 0.0                      # clipped -> zero gradient

    logp, inp = ppo_inputs([0.3], [1.0])
    loss, met = PPOClip(PPOClip.Params(eps_high=0.28))(inp)
    assert abs(loss.item() - (-1.28)) < 1e-6
    loss.sum().backward()
    assert logp.grad.item() == 0.0

    logp, inp = ppo_inputs([0.1], [1.0])                 # unclipped: dL/dlogp = -A * rho
    loss, met = PPOClip()(inp)
    loss.sum().backward()
    assert abs(loss.item() + math.exp(0.1)) < 1e-6
    assert abs(logp.grad.item() + math.exp(0.1)) < 1e-6
    assert met["clipfrac"].item() == 0.0


def test_ppo_dual_clip():
    logp, inp = ppo_inputs([math.log(4.0), math.log(4.0)], [-1.0, 1.0])
    loss, met = PPOClip(PPOClip.Params(dual_clip=3.0))(inp)
    assert torch.allclose(loss, torch.tensor([[3.0, -1.2]]), atol=1e-6)
    assert torch.equal(met["dual_clip_frac"], torch.tensor([[1.0, 0.0]]))
    loss, _ = PPOClip()(inp)
    assert torch.allclose(loss, torch.tensor([[4.0, -1.2]]), atol=1e-6)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            PPOClip.Params(dual_clip=bad)


def test_ppo_rollout_is_weights():
    _, inp = ppo_inputs([0.1], [1.0])
    inp.rollout_is_weights = torch.tensor([[0.5]])
    loss, _ = PPOClip()(inp)
    assert abs(loss.item() + 0.5 * math.exp(0.1)) < 1e-6


# --------------------------------------------------------------------- GSPO
def test_gspo_worked_example_and_gradient():
    logp = torch.tensor([[0.1, -0.1, 0.3, 0.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    inp = LossInputs(logprobs=logp, old_logprobs=old, advantages=torch.ones(1, 4), mask=mask)
    loss, met = GSPO(GSPO.Params(eps_low=0.2, eps_high=0.2))(inp)
    r = math.exp(0.1)
    assert abs(r - 1.105171) < 1e-6
    assert torch.allclose(loss, torch.tensor([[-r, -r, -r, 0.0]]), atol=1e-6)
    assert torch.equal(met["clipfrac"], torch.zeros(1, 4))
    seq_mean_token_mean(loss, mask).backward()
    assert torch.allclose(logp.grad, torch.tensor([[-r / 3, -r / 3, -r / 3, 0.0]]), atol=1e-6)
    # paper defaults 3e-4 / 4e-4: exp(0.1) is clipped -> value -(1+4e-4), zero gradient
    assert GSPO.Params().eps_low == 3e-4 and GSPO.Params().eps_high == 4e-4
    logp2 = logp.detach().clone().requires_grad_(True)
    inp2 = LossInputs(logprobs=logp2, old_logprobs=old, advantages=torch.ones(1, 4), mask=mask)
    loss2, met2 = GSPO()(inp2)
    assert torch.allclose(loss2[0, :3], torch.full((3,), -(1 + 4e-4)), atol=1e-7)
    assert met2["clipfrac"][0, :3].sum().item() == 3.0
    loss2.sum().backward()
    assert torch.equal(logp2.grad, torch.zeros(1, 4))


# -------------------------------------------------------------- aggregation
AGG_LOSS = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_aggregation_worked_example():
    norm = make_norm(AGG_MASK)
    assert (norm.num_tokens, norm.num_seqs, norm.max_len) == (6.0, 2.0, 4.0)
    assert abs(token_mean(AGG_LOSS, AGG_MASK, norm).item() - 1.666667) < 1e-5
    assert abs(seq_mean_token_mean(AGG_LOSS, AGG_MASK, norm).item() - 1.5) < 1e-6
    assert abs(seq_mean_token_sum(AGG_LOSS, AGG_MASK, norm).item() - 5.0) < 1e-6
    assert abs(seq_mean_token_sum_norm(AGG_LOSS, AGG_MASK, norm).item() - 1.25) < 1e-6
    # norm=None -> make_norm of this mask
    assert abs(token_mean(AGG_LOSS, AGG_MASK).item() - 10 / 6) < 1e-6


def test_aggregation_microbatch_additivity():
    norm = make_norm(AGG_MASK)
    for fn in AGGS:
        whole = fn(AGG_LOSS, AGG_MASK, norm)
        parts = fn(AGG_LOSS[:1, :2], AGG_MASK[:1, :2], norm) + fn(AGG_LOSS[1:], AGG_MASK[1:], norm)
        assert abs(whole.item() - parts.item()) < 1e-6, fn.__name__
    # with an empty row in a micro-batch (contributes 0, not counted)
    loss = torch.cat([AGG_LOSS, torch.full((1, 4), 5.0)])
    mask = torch.cat([AGG_MASK, torch.zeros(1, 4)])
    norm2 = make_norm(mask)
    assert norm2.num_seqs == 2.0
    exp = {token_mean: 10 / 6, seq_mean_token_mean: 1.5, seq_mean_token_sum: 5.0, seq_mean_token_sum_norm: 1.25}
    for fn in AGGS:
        parts = fn(loss[:1], mask[:1], norm2) + fn(loss[1:], mask[1:], norm2)
        assert abs(parts.item() - exp[fn]) < 1e-6, fn.__name__


def test_aggregation_fractional_weights():
    mask = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = torch.tensor([[2.0, 4.0, 99.0], [3.0, 99.0, 99.0]])
    norm = make_norm(mask)
    assert norm.num_tokens == 2.5
    assert abs(token_mean(loss, mask, norm).item() - 8.0 / 2.5) < 1e-6
    assert abs(seq_mean_token_mean(loss, mask, norm).item() - ((5.0 / 1.5) + 3.0) / 2) < 1e-6


# ---------------------------------------------------------- padding invariance
def test_padding_never_changes_loss():
    g = torch.Generator().manual_seed(0)
    S, T, P = 3, 4, 3
    lens = [4, 2, 3]
    mask = torch.zeros(S, T)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    logp = -torch.rand(S, T, generator=g)
    old = logp + 0.05 * torch.randn(S, T, generator=g)
    adv = torch.randn(S, 1, generator=g).expand(S, T).clone()

    def padded(x):
        """real tokens kept; padding positions and P extra columns hold garbage"""
        x = torch.where(mask > 0, x, 50 * torch.randn(S, T, generator=g))
        return torch.cat([x, 50 * torch.randn(S, P, generator=g)], 1)

    mask_p = torch.cat([mask, torch.zeros(S, P)], 1)
    for loss_fn in (PPOClip(PPOClip.Params(dual_clip=3.0)), GSPO(GSPO.Params(eps_low=0.2, eps_high=0.2))):
        lp_a = logp.clone().requires_grad_(True)
        la, _ = loss_fn(LossInputs(logprobs=lp_a, old_logprobs=old, advantages=adv, mask=mask))
        lp_b = padded(logp).requires_grad_(True)
        lb, _ = loss_fn(LossInputs(logprobs=lp_b, old_logprobs=padded(old), advantages=padded(adv), mask=mask_p,
                                   rollout_is_weights=padded(torch.ones(S, T))))
        for fn in AGGS:
            # Dr.GRPO's L_max is a configured constant, not the padded width
            va, vb = fn(la, mask, make_norm(mask, max_len=8)), fn(lb, mask_p, make_norm(mask_p, max_len=8))
            assert torch.isfinite(va) and abs(va.item()) > 1e-3
            assert abs(va.item() - vb.item()) < 1e-6, (type(loss_fn).__name__, fn.__name__)
            ga = torch.autograd.grad(va, lp_a, retain_graph=True)[0]
            gb = torch.autograd.grad(vb, lp_b, retain_graph=True)[0]
            assert torch.allclose(ga, gb[:, :T], atol=1e-7)
            assert torch.equal(gb[mask_p == 0], torch.zeros(int((mask_p == 0).sum())))
    # aggregation alone: garbage (even inf / nan) in padding never leaks
    loss = torch.tensor([[1.0, 1.0, float("inf"), float("nan")], [2.0, 2.0, 2.0, 2.0]])
    for fn in AGGS:
        assert abs(fn(loss, AGG_MASK, make_norm(AGG_MASK)).item() - fn(AGG_LOSS, AGG_MASK, make_norm(AGG_MASK)).item()) < 1e-7


# ---------------------------------------------------------------------- KL
def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-1.2])
    assert abs(k1(lp, ref).item() - 0.2) < 1e-6
    assert abs(k2(lp, ref).item() - 0.02) < 1e-6
    assert abs(k3(lp, ref).item() - 0.018731) < 1e-6
    assert abs(abs_kl(ref, lp).item() - 0.2) < 1e-6
    assert abs(kl_loss_term(lp, ref, "low_var_kl").item() - 0.018731) < 1e-6
    assert abs(kl_loss_term(lp, ref, "k1").item() - 0.2) < 1e-6
    # clamps: -d clamped to 20 -> exp(20) - 20 - 1, then result clamped to 10
    assert k3(torch.tensor([-100.0]), torch.tensor([0.0])).item() == 10.0
    # k3+: k3 value, k2 gradient (d)
    x = torch.tensor([-1.0], requires_grad=True)
    y = k3_straight_through(x, ref)
    y.backward()
    assert abs(y.item() - 0.018731) < 1e-6 and abs(x.grad.item() - 0.2) < 1e-6


# ------------------------------------------------------------------ entropy
def test_entropy_bonus():
    H = torch.tensor([[0.5, 1.5, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    inp = LossInputs(logprobs=torch.zeros(1, 3), old_logprobs=torch.zeros(1, 3), advantages=torch.zeros(1, 3), mask=mask)
    loss, met = EntropyBonus(EntropyBonus.Params(coef=0.01))(inp, ForwardOutput(logprobs=inp.logprobs, entropy=H), None)
    assert torch.allclose(loss, torch.tensor([[-0.005, -0.015, 0.0]]))
    assert torch.allclose(met["entropy"], torch.tensor([[0.5, 1.5, 0.0]]))
    with pytest.raises(ValueError, match="entropy"):
        EntropyBonus()(inp, ForwardOutput(logprobs=inp.logprobs, entropy=None), None)


# --------------------------------------------------------------------- DAPO
def test_dapo_dynamic_sampling():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.5, float("nan"), 0.0, 1.0, 0.3, 0.3, float("nan")]
    gids = [0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4]
    b = make_batch(rewards, [1, 2, 3, 1, 2, 3, 4, 1, 2, 2, 2], group_ids=gids, T=6)
    f = DAPODynamicSampling()
    assert f.max_refill_rounds == 3 and f.stage == "pre_advantage"
    out = f(b)
    assert out.group_ids.tolist() == [0, 0, 3, 3, 3]
    assert torch.equal(out.rewards[[0, 1, 3, 4]], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert math.isnan(out.rewards[2].item())
    assert out.response_mask.shape == (5, 4)      # trimmed to the longest kept row
    assert f.metrics() == {"filter/dapo_dropped_groups": 3.0, "filter/dapo_kept_groups": 2.0}
    # everything dropped -> empty batch
    empty = f(make_batch([1.0, 1.0, 0.0], [1, 1, 1], group_ids=[0, 0, 1]))
    assert len(empty) == 0 and empty.group_ids.numel() == 0
    assert f.metrics() == {"filter/dapo_dropped_groups": 2.0, "filter/dapo_kept_groups": 0.0}
    assert DAPODynamicSampling(DAPODynamicSampling.Params(max_refill_rounds=0)).max_refill_rounds == 0
    with pytest.raises(ValueError, match="metric"):
        DAPODynamicSampling.Params(metric="acc")


# ------------------------------------------------- issue 10, item 7: numerics vs verl 0.9.1
def _holes_batch(rewards_last=1.0, values=None):
    m = torch.tensor([[1.0, 1, 0, 0, 1, 1]])                      # a tool/observation hole at positions 2-3
    return Batch(prompt_ids=[[1]], response_ids=torch.ones(1, 6, dtype=torch.long), response_mask=m,
                 group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.tensor([rewards_last]), values=values)


def test_reinforce_pp_carries_return_through_masked_holes():
    from rlkit.objectives.reinforce_pp import discounted_returns

    m = torch.tensor([[1, 1, 0, 0, 1, 1]]).bool()
    r = torch.tensor([[0.0, 0, 0, 0, 0, 1]], dtype=torch.float64)
    assert discounted_returns(r, m, 1.0).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]       # verl 0.9.1 (was [0,0,0,0,1,1])
    # gamma 0.5: the hole is not a step (no discount across it): 1, 0.5 | hole | 0.25, 0.125
    assert discounted_returns(r, m, 0.5).tolist() == [[0.125, 0.25, 0.0, 0.0, 0.5, 1.0]]
    # a reward on a hole position is ignored; padding after the last real token holds nothing
    r2 = torch.tensor([[0.0, 0, 7, 0, 0, 1, 9]], dtype=torch.float64)
    m2 = torch.tensor([[1, 1, 0, 0, 1, 1, 0]]).bool()
    assert discounted_returns(r2, m2, 1.0).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    b = _holes_batch()
    ReinforcePP()(b)
    assert b.returns.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_gae_carries_through_masked_holes():
    # gamma 1, lam 0.5, V = [0.1, 0.2, (9, 9 in the hole), 0.4, 0.5], reward 1 on the last token:
    # t5: d = 1 - 0.5 = 0.5, A = 0.5;  t4: d = 0.5 - 0.4 = 0.1, A = 0.1 + 0.5 * 0.5 = 0.35
    # hole: V_next stays 0.4, A stays 0.35;  t1: d = 0.4 - 0.2 = 0.2, A = 0.2 + 0.5 * 0.35 = 0.375
    # t0: d = 0.2 - 0.1 = 0.1, A = 0.1 + 0.5 * 0.375 = 0.2875;  returns = A + V
    V = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.4, 0.5]])
    r = torch.tensor([[0.0, 0, 0, 0, 0, 1]], dtype=torch.float64)
    adv, ret = gae_advantages(r, V, torch.tensor([[1, 1, 0, 0, 1, 1]]).bool(), gamma=1.0, lam=0.5)
    assert torch.allclose(adv.float(), torch.tensor([[0.2875, 0.375, 0.0, 0.0, 0.35, 0.5]]), atol=1e-6)
    assert torch.allclose(ret.float(), torch.tensor([[0.3875, 0.575, 0.0, 0.0, 0.75, 1.0]]), atol=1e-6)


def test_dr_grpo_normaliser_is_a_configured_constant():
    from rlkit.config import ConfigError, load_config
    from rlkit.objectives.aggregation import norm_max_len
    from rlkit.plugins import AggNorm
    from tests.conftest import tiny_overrides

    # sum m*l / (N_seq * L): [1,1] and [2,2,2,2] -> 10 / (2 * 8) = 0.625 with L = 8, whatever the padded width
    for T in (4, 9):
        loss, mask = torch.zeros(2, T), torch.zeros(2, T)
        loss[0, :2], loss[1, :4], mask[0, :2], mask[1, :4] = 1.0, 2.0, 1.0, 1.0
        assert seq_mean_token_sum_norm(loss, mask, AggNorm(num_tokens=6, num_seqs=2, max_len=8)).item() == 0.625
    P = seq_mean_token_sum_norm.Params
    assert norm_max_len(seq_mean_token_sum_norm, P(), 512) == 512.0          # default rollout.max_new_tokens
    assert norm_max_len(seq_mean_token_sum_norm, P(max_len=4096), 512) == 4096.0
    assert norm_max_len(token_mean, None, 512) == 512.0
    with pytest.raises(ConfigError, match="max_len"):
        load_config(tiny_overrides("/tmp", **{"algorithm.aggregation": "{name: seq_mean_token_sum_norm, max_len: 0}"}))


def _trainer_for_losses(tmp_path, echo_rows, **extra):
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import tiny_overrides

    return Trainer(load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 1, **extra})), train_rows=echo_rows)


def test_trainer_agg_norm_max_len_and_value_loss_normaliser(tmp_path, echo_rows):
    """7b: the Dr.GRPO constant is rollout.max_new_tokens (or the aggregation's max_len), not the mini-batch's
    longest response.  7c: with token weighting and a critic, the value loss is normalised by the response mask it
    sums over, not by the token weights."""
    from rlkit.metrics import MetricSums

    tr = _trainer_for_losses(tmp_path / "b", echo_rows, **{"algorithm.aggregation": "{name: seq_mean_token_sum_norm, max_len: 50}"})
    assert tr.agg_max_len == 50.0
    tr = _trainer_for_losses(tmp_path / "c", echo_rows, **{"algorithm.advantage": "gae", "algorithm.aggregation": "token_mean"})
    assert tr.agg_max_len == 6.0                                          # rollout.max_new_tokens
    ids = tr.tokenizer("abc:")["input_ids"]
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    b = Batch(prompt_ids=[ids] * 2, response_ids=torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]), response_mask=mask,
              group_ids=torch.tensor([0, 1]), advantages=torch.zeros(2, 4), old_logprobs=torch.zeros(2, 4),
              token_weights=torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]]), returns=torch.tensor([[1.0] * 4, [2.0] * 4]) * mask)
    with torch.no_grad():
        _, V = tr._forward(tr.policy, b, False, grad=False, values=True)
    b.old_values = V.float().cpu() * mask
    ms = MetricSums()
    tr._update(b, ms)
    got = ms.reduce()["loss/value"]
    # 0.5 (V - R)^2 summed over the 6 real tokens, / 6 (the mask count; the token weights sum to 2)
    exp = float((0.5 * (b.old_values - b.returns) ** 2 * mask).sum() / 6)
    assert got == pytest.approx(exp, rel=1e-4) and exp > 0
    # Dr.GRPO in the update: ratio 1 (old = current log-probs), A = 1 on the 6 real tokens, 2 sequences:
    # loss = -6 / (2 x 6) = -0.5 with L = max_new_tokens = 6 (the padded width 4 would give -0.75)
    tr.aggregate = seq_mean_token_sum_norm
    b2 = Batch(prompt_ids=[ids] * 2, response_ids=b.response_ids, response_mask=mask, group_ids=torch.tensor([0, 1]),
               advantages=mask.clone(), returns=b.returns, old_values=b.old_values)
    with torch.no_grad():
        (lp, _, _), _ = tr._forward(tr.policy, b2, False, grad=False)
    b2.old_logprobs = lp.float().cpu() * mask
    ms = MetricSums()
    tr._update(b2, ms)
    assert ms.reduce()["loss/policy"] == pytest.approx(-0.5, rel=1e-4)


def test_kl_in_reward_metrics_token_and_sequence_means():
    """7d: kl_reward/token_mean weights every token equally; kl_reward/seq_mean is verl's mean over sequences of
    the per-sequence token mean.  k1 = old - ref: row 0 [2] (1 token), row 1 [1, 1, 1]: token 5/4, seq (2+1)/2."""
    from types import SimpleNamespace

    from rlkit.metrics import MetricSums
    from rlkit.trainer import Trainer

    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    b = Batch(prompt_ids=[[1], [1]], response_ids=torch.ones(2, 3, dtype=torch.long), response_mask=mask,
              group_ids=torch.tensor([0, 1]), rewards=torch.tensor([1.0, 0.0]),
              old_logprobs=torch.tensor([[-1.0, 0, 0], [-1, -1, -1]]), ref_logprobs=torch.tensor([[-3.0, 0, 0], [-2, -2, -2]]))
    fake = SimpleNamespace(cfg=SimpleNamespace(algorithm=SimpleNamespace(kl=SimpleNamespace(coef=0.1))), kl_fn=k1)
    ms = MetricSums()
    Trainer._kl_in_reward(fake, b, ms)
    out = ms.reduce()
    assert out["kl_reward/token_mean"] == pytest.approx(1.25) and out["kl_reward/seq_mean"] == pytest.approx(1.5)
    assert torch.allclose(b.token_rewards, torch.tensor([[1.0 - 0.2, 0, 0], [-0.1, -0.1, -0.1]]))
