"""TEMPO advantage (rlkit/algorithms/tempo.py) against the spec (credit_and_sampling.md Sec. 1)."""
import math
import random

import pytest
import torch

from rlkit.batch import Batch
from rlkit.registry import ADVANTAGES

EOS = 2


def tempo(**kw):
    cls = ADVANTAGES.get("tempo")
    return cls(cls.Params(**kw))


def make_batch(seqs, rewards, groups=None, pad=0, extra_pad=0):
    S = len(seqs)
    T = max(len(s) for s in seqs) + extra_pad
    ids = torch.full((S, T), pad, dtype=torch.long)
    mask = torch.zeros(S, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    g = torch.zeros(S, dtype=torch.long) if groups is None else torch.tensor(groups, dtype=torch.long)
    return Batch(prompt_ids=[[1]] * S, response_ids=ids, response_mask=mask, group_ids=g,
                 rewards=torch.tensor(rewards, dtype=torch.float32))


def reference(seqs, rewards, groups, scale_by_std=True, eps=1e-6, td_coef=1.0):
    """The spec's definition, literally: compatible sets P_i(t), B_i(t) by brute force."""
    S = len(seqs)
    T = max(len(s) for s in seqs)
    out = [[0.0] * T for _ in range(S)]
    for g in set(groups):
        rows = [i for i in range(S) if groups[i] == g]
        R = [rewards[i] for i in rows]
        n = len(R)
        if n < 2 or max(R) == min(R):
            continue
        mu = sum(R) / n
        sd = math.sqrt(sum((r - mu) ** 2 for r in R) / (n - 1))
        for i in rows:
            si = seqs[i]
            for t in range(len(si)):
                P = [k for k in rows if len(seqs[k]) >= t and seqs[k][:t] == si[:t]]
                B = [k for k in P if len(seqs[k]) > t and seqs[k][t] == si[t]]
                v = lambda ks: sum(rewards[k] for k in ks) / len(ks)  # noqa: E731
                a = (rewards[i] - mu) + td_coef * (v(B) - v(P))
                out[i][t] = a / (sd + eps) if scale_by_std else a
    return torch.tensor(out, dtype=torch.float64)


SPEC_SEQS = [[5, 7, 9, 2], [5, 7, 8, 2], [5, 6, 9, 2], [5, 7, 9, 3, 2]]
SPEC_R = [1.0, 0.0, 1.0, 0.0]
SPEC_A = [
    [0.8660, 0.5774, 1.1547, 1.7321, 0.0],
    [-0.8660, -1.1547, -1.4434, -0.8660, 0.0],
    [0.8660, 1.7321, 0.8660, 0.8660, 0.0],
    [-0.8660, -1.1547, -0.5774, -1.7321, -0.8660],
]


def test_spec_worked_example():
    b = make_batch(SPEC_SEQS, SPEC_R)
    tempo()(b)
    assert b.advantages.dtype == torch.float32
    torch.testing.assert_close(b.advantages.double(), torch.tensor(SPEC_A, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(b.returns, b.advantages)
    # token 0 ("5") is not a branch token: pure GRPO value
    assert b.advantages[:, 0].abs().tolist() == pytest.approx([0.8660254] * 4, abs=1e-5)


def test_spec_example_unnormalised():
    b = make_batch(SPEC_SEQS, SPEC_R)
    tempo(scale_by_std=False)(b)
    sd = math.sqrt(1 / 3)
    expect = torch.tensor(SPEC_A, dtype=torch.float64) * (sd + 1e-6)
    torch.testing.assert_close(b.advantages.double(), expect, atol=1e-4, rtol=0)
    assert b.advantages[0, 3].item() == pytest.approx(1.0, abs=1e-6)   # (1 - 0.5) + (1 - 0.5)


@pytest.mark.parametrize("reward", [0.0, 1.0, 0.37])
def test_all_equal_rewards_give_exact_zeros(reward):
    b = make_batch(SPEC_SEQS, [reward] * 4)
    tempo()(b)
    assert torch.equal(b.advantages, torch.zeros_like(b.advantages))


def test_singleton_group_and_nan_reward_rows_are_zero():
    seqs = SPEC_SEQS + [[5, 5, 2]]
    b = make_batch(seqs, SPEC_R + [1.0], groups=[0, 0, 0, 0, 1])
    tempo()(b)
    assert torch.isfinite(b.advantages).all()
    assert torch.equal(b.advantages[4], torch.zeros_like(b.advantages[4]))   # official code: NaN
    torch.testing.assert_close(b.advantages[:4].double(), torch.tensor(SPEC_A, dtype=torch.float64), atol=1e-4, rtol=0)
    # a NaN reward row is left out of the tree and of the group statistics
    b2 = make_batch(SPEC_SEQS + [[5, 7, 9, 2]], SPEC_R + [float("nan")])
    tempo()(b2)
    assert torch.equal(b2.advantages[4], torch.zeros_like(b2.advantages[4]))
    torch.testing.assert_close(b2.advantages[:4].double(), torch.tensor(SPEC_A, dtype=torch.float64), atol=1e-4, rtol=0)


def _random_group(rng, n, vocab=3, max_len=7):
    """Responses that share prefixes (copy a random earlier response up to a random point)."""
    seqs = []
    for _ in range(n):
        if seqs and rng.random() < 0.8:
            base = rng.choice(seqs)
            cut = rng.randint(0, len(base))
            s = list(base[:cut])
        else:
            s = []
        while len(s) < max_len and not (s and s[-1] == EOS):
            s.append(rng.randint(3, 3 + vocab - 1) if rng.random() > 0.2 else EOS)
        if rng.random() < 0.2 and len(s) > 1:      # some truncated responses (no EOS)
            s = s[: rng.randint(1, len(s))]
        if not s:
            s = [EOS]
        seqs.append(s)
    return seqs


@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_definition(seed):
    rng = random.Random(seed)
    seqs, R, G = [], [], []
    for g in range(4):
        n = rng.choice([1, 2, 5, 8])
        s = _random_group(rng, n)
        seqs += s
        R += [float(rng.choice([0.0, 1.0, 0.5])) for _ in s]
        G += [10 * g + 3] * n
    for kw in (dict(), dict(scale_by_std=False), dict(td_coef=0.5)):
        b = make_batch(seqs, R, G, extra_pad=2)
        tempo(**kw)(b)
        ref = reference(seqs, R, G, **kw)
        torch.testing.assert_close(b.advantages[:, :ref.shape[1]].double(), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(b.advantages[:, ref.shape[1]:], torch.zeros(len(seqs), 2))


def test_row_permutation_invariance():
    rng = random.Random(7)
    seqs = _random_group(rng, 8) + _random_group(rng, 8)
    R = [float(rng.random() < 0.5) for _ in seqs]
    G = [0] * 8 + [1] * 8
    b = make_batch(seqs, R, G)
    tempo()(b)
    perm = list(range(16))
    rng.shuffle(perm)
    bp = make_batch([seqs[i] for i in perm], [R[i] for i in perm], [G[i] for i in perm])
    tempo()(bp)
    torch.testing.assert_close(bp.advantages, b.advantages[perm], atol=1e-6, rtol=0)


def test_telescoping_td_terms():
    """Sum_t delta_t = V(final node) - mu; = r_i - mu for a response whose path is unique."""
    rng = random.Random(3)
    for _ in range(5):
        seqs = _random_group(rng, 8)
        R = [float(rng.randint(0, 4)) for _ in seqs]
        if max(R) == min(R):
            continue
        b = make_batch(seqs, R)
        tempo(scale_by_std=False)(b)
        mu = sum(R) / len(R)
        for i, s in enumerate(seqs):
            td = b.advantages[i, :len(s)].double() - (R[i] - mu)
            # the final node of response i = its full sequence; every response with that prefix passes
            # through it (exact duplicates, or longer responses when i was truncated)
            through = [k for k, o in enumerate(seqs) if o[:len(s)] == s]
            final = sum(R[k] for k in through) / len(through)
            assert td.sum().item() == pytest.approx(final - mu, abs=1e-5)
            if len(through) == 1:
                assert td.sum().item() == pytest.approx(R[i] - mu, abs=1e-5)


def test_pad_equal_to_eos_is_not_merged():
    """pad id == EOS id: a finished response must leave the compatible set where the
    longer response still has a real token (the official code keeps it)."""
    seqs = [[5, 7, EOS], [5, 7, EOS, EOS], [5, 8, EOS]]   # row 1 emits a real EOS where row 0 is already padding
    R = [1.0, 0.0, 0.0]
    b = make_batch(seqs, R, pad=EOS, extra_pad=3)
    tempo()(b)
    ref = reference(seqs, R, [0, 0, 0])
    torch.testing.assert_close(b.advantages[:, :4].double(), ref, atol=1e-5, rtol=0)
    # the same tokens padded with 0 give the same advantages
    b0 = make_batch(seqs, R, pad=0, extra_pad=3)
    tempo()(b0)
    torch.testing.assert_close(b.advantages, b0.advantages)
    # row 1's last token (the 2nd EOS) is a branch: V({1}) - V({0, 1}) = 0 - 0.5
    mu, sd = 1 / 3, math.sqrt(1 / 3)
    assert b.advantages[1, 3].item() == pytest.approx((0 - mu - 0.5) / (sd + 1e-6), abs=1e-5)
    assert torch.equal(b.advantages[0, 3:], torch.zeros(4))


def test_token_rewards_and_batch_std_scope():
    b = make_batch(SPEC_SEQS, SPEC_R)
    tr = torch.zeros_like(b.response_mask)
    for i, s in enumerate(SPEC_SEQS):
        tr[i, len(s) - 1] = SPEC_R[i]
    b.token_rewards = tr
    tempo()(b)
    torch.testing.assert_close(b.advantages.double(), torch.tensor(SPEC_A, dtype=torch.float64), atol=1e-4, rtol=0)
    # std over the whole batch: two copies of the group have std sqrt(4/14) instead of sqrt(1/3)
    seqs = SPEC_SEQS + SPEC_SEQS
    b2 = make_batch(seqs, SPEC_R + SPEC_R, groups=[0] * 4 + [1] * 4)
    tempo(std_scope="batch", eps=0.0)(b2)
    scale = math.sqrt(1 / 3) / math.sqrt(4 / 14)
    torch.testing.assert_close(b2.advantages[:4].double(), torch.tensor(SPEC_A, dtype=torch.float64) * scale, atol=2e-4, rtol=0)


def test_config_names_and_param_errors():
    from rlkit.config import load_config

    cfg = load_config(["model.name_or_path=x", "reward.functions=[gsm8k_strict]",
                       "algorithm.advantage={name: tempo, scale_by_std: false, td_coef: 1.0}"])
    assert cfg.algorithm.advantage.name == "tempo"
    with pytest.raises(ValueError, match="eps"):  # ConfigError is a ValueError too
        load_config(["model.name_or_path=x", "reward.functions=[gsm8k_strict]", "algorithm.advantage={name: tempo, eps: -1}"])
