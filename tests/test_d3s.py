"""D³S plugins (rlkit/algorithms/d3s.py) against the spec (credit_and_sampling.md Sec. 3)."""
import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from rlkit.algorithms.d3s import D3SSamples, D3SSchedule, D3STokens, max_variance_subset
from rlkit.batch import Batch
from rlkit.plugins import PluginContext
from rlkit.registry import ADVANTAGES, CONTROLLERS, FILTERS, TOKEN_WEIGHTING


def make_batch(rewards, groups, T=2, entropy=None, lengths=None):
    S = len(rewards)
    mask = torch.ones(S, T)
    if lengths is not None:
        for i, L in enumerate(lengths):
            mask[i, L:] = 0
    b = Batch(prompt_ids=[[1]] * S, response_ids=torch.randint(3, 9, (S, T)) * mask.long(), response_mask=mask,
              group_ids=torch.tensor(groups, dtype=torch.long), rewards=torch.tensor(rewards, dtype=torch.float32),
              info={"row": list(range(S))})
    if entropy is not None:
        b.entropy = torch.tensor(entropy, dtype=torch.float32) * mask
    return b


def samples(**kw):
    return FILTERS.get("d3s_samples")(D3SSamples.Params(**kw))


def tokens(**kw):
    return TOKEN_WEIGHTING.get("d3s_tokens")(D3STokens.Params(**kw))


def pop_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


# ------------------------------------------------------------- spec example
SPEC_R = [1, 1, 1, 0, 0, 0, 0, 0]
# entropies of the 4 kept responses (spec "resp1..resp4" = rows 1..4 of the group); other rows arbitrary
SPEC_H = [[9.0, 9.0], [0.1, 2.0], [0.5, 0.3], [1.5, 0.2], [0.05, 0.4], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]


def test_spec_sample_example():
    b = make_batch(SPEC_R, [0] * 8)
    ADVANTAGES.get("grpo")()(b)
    a = b.advantages[:, 0].double()
    assert a[0].item() == pytest.approx(1.2076, abs=1e-4) and a[3].item() == pytest.approx(-0.7246, abs=1e-4)
    # variance of "k top + (4-k) bottom": 0, 0.70, 0.9333, 0.70, 0
    hi, lo = a[0].item(), a[3].item()
    assert [pop_var([hi] * k + [lo] * (4 - k)) for k in range(5)] == pytest.approx([0, 0.70, 0.9333, 0.70, 0], abs=1e-3)
    f = samples(keep=0.5)
    out = f(b)
    # 2 correct + 2 incorrect; with the spec's stable ascending sort: rows {1, 2} and {3, 4} (0-based)
    assert out.info["row"] == [1, 2, 3, 4]
    assert out.rewards.tolist() == [1, 1, 0, 0]
    m = f.metrics()
    assert m["d3s/kept_samples"] == 4 and m["d3s/kept_pos"] == 2 and m["d3s/kept_neg"] == 2
    assert m["d3s/adv_var_kept"] == pytest.approx(0.9333, abs=1e-3)


def test_spec_token_example():
    b = make_batch(SPEC_R, [0] * 8, entropy=SPEC_H)
    ADVANTAGES.get("grpo")()(b)
    b = samples(keep=0.5)(b)
    b.token_weights = torch.ones_like(b.response_mask)
    w = tokens(top_frac=0.5)
    w(b)
    # spec: keep (1,1), (3,0), (2,0), (2,1) -- response labels 1..4 = original rows 1..4, token positions 0-based
    kept = sorted((b.info["row"][i], t) for i, t in torch.nonzero(b.token_weights).tolist())
    assert kept == sorted([(1, 1), (3, 0), (2, 0), (2, 1)])
    assert w.metrics()["d3s/kept_token_frac"] == 0.5


def test_token_example_scores_and_sequence_scope():
    A = [1.2076] * 2 + [-0.7246] * 2
    b = make_batch([1, 1, 0, 0], [0] * 4, entropy=SPEC_H[1:5])
    b.advantages = torch.tensor(A)[:, None].expand(4, 2).clone()
    b.token_weights = torch.ones(4, 2)
    tokens(top_frac=0.5, scope="sequence")(b)
    # one token per row: the higher-entropy one
    assert torch.nonzero(b.token_weights).tolist() == [[0, 1], [1, 0], [2, 0], [3, 1]]
    # weights already 0 (e.g. another weighting) are never candidates, and K = 1 keeps all candidates
    b.token_weights = torch.tensor([[1.0, 0.0]] * 4)
    tokens(top_frac=1.0)(b)
    assert b.token_weights.tolist() == [[1.0, 0.0]] * 4


def test_tokens_need_entropy_and_count_rule():
    assert D3STokens.needs == frozenset({"entropy"})
    b = make_batch([1, 0, 1], [0] * 3, T=5, entropy=[[1.0] * 5] * 3, lengths=[5, 3, 1])
    ADVANTAGES.get("grpo")()(b)
    b.token_weights = torch.ones_like(b.response_mask)
    tokens(top_frac=0.2)(b)
    assert int(b.token_weights.sum()) == 2                 # ceil(0.2 * 9 real tokens)
    assert (b.token_weights <= b.response_mask).all()      # padding never kept
    b.entropy = None
    with pytest.raises(ValueError, match="entropy"):
        tokens()(b)


@pytest.mark.parametrize("seed", range(8))
def test_token_selection_matches_stable_sort_definition(seed):
    """top ceil(K * count) of |A| x H, ties broken by (row, position): checked against a stable sort,
    with heavy ties (quantised scores), masked padding and tokens already weighted 0."""
    g = torch.Generator().manual_seed(seed)
    S, T = 9, 13
    lengths = torch.randint(0, T + 1, (S,), generator=g).tolist()
    b = make_batch([float(i % 2) for i in range(S)], [0] * S, T=T, lengths=lengths)
    b.advantages = torch.randint(-2, 3, (S, T), generator=g).float() * b.response_mask
    b.entropy = torch.randint(0, 3, (S, T), generator=g).float() * 0.5 * b.response_mask
    b.token_weights = (torch.rand(S, T, generator=g) > 0.2).float()
    for scope in ("batch", "sequence"):
        for frac in (0.05, 0.2, 0.5, 0.99, 1.0):
            cand = b.weights() > 0
            score = (b.advantages.abs() * b.entropy).tolist()
            ref = torch.zeros(S, T, dtype=torch.bool)
            pools = [[(i, t) for i in range(S) for t in range(T) if cand[i, t]]] if scope == "batch" else \
                [[(i, t) for t in range(T) if cand[i, t]] for i in range(S)]
            for pool in pools:
                k = max(1, math.ceil(frac * len(pool) - 1e-9)) if pool else 0
                for i, t in sorted(pool, key=lambda it: -score[it[0]][it[1]])[:k]:   # sorted() is stable
                    ref[i, t] = True
            got = D3STokens(D3STokens.Params(top_frac=frac, scope=scope)).keep_mask(b)
            assert torch.equal(got, ref), (scope, frac)


# ------------------------------------------------------ exact search checks
@pytest.mark.parametrize("seed", range(40))
def test_max_variance_subset_matches_bruteforce(seed):
    rng = random.Random(seed)
    m = rng.randint(1, 9)
    vals = [rng.choice([rng.gauss(0, 1), rng.choice([-1.0, 0.5, 2.0])]) for _ in range(m)]
    for n in range(1, m + 1):
        idx = max_variance_subset(vals, n)
        assert len(idx) == n == len(set(idx)) and idx == sorted(idx)
        best = max(pop_var([vals[i] for i in c]) for c in itertools.combinations(range(m), n))
        assert pop_var([vals[i] for i in idx]) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_max_variance_subset_balanced_and_clipping():
    vals = [3.0, 2.0, 1.0, -1.0, -5.0]
    assert max_variance_subset(vals, 2) == [0, 4]
    assert max_variance_subset(vals, 3, balanced=True) == [0, 3, 4]     # k = 1 top, 2 bottom
    assert max_variance_subset(vals, 4, balanced=True) == [0, 1, 3, 4]
    assert max_variance_subset(vals, 10) == [0, 1, 2, 3, 4]
    assert max_variance_subset([], 3) == []


# ---------------------------------------------------------------- filtering
def test_cross_group_drops_zero_advantage_groups_and_uses_fewer():
    # group 0 all correct, group 1 all wrong, group 2 mixed (2 non-zero rows)
    b = make_batch([1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2])
    ADVANTAGES.get("grpo")()(b)
    out = samples(keep=1.0)(b)
    assert out.info["row"] == [4, 5]                       # N = 6 but only 2 rows have A != 0 [INFERRED: fewer]
    out = samples(keep=1.0, fill="zero_advantage")(b)
    assert out.info["row"] == list(range(6))
    b0 = make_batch([1, 1, 0, 0], [0, 0, 1, 1])
    ADVANTAGES.get("grpo")()(b0)
    assert samples()(b0) is None                           # nothing to train this step


def test_group_scope_keeps_per_group_count():
    rng = random.Random(0)
    R = [float(rng.random() < 0.5) for _ in range(32)]
    G = [i // 8 for i in range(32)]
    R[0:8] = [1.0] * 8                                     # a constant group is skipped
    R[8:16] = [1, 0, 0, 0, 0, 0, 0, 1]
    b = make_batch(R, G)
    ADVANTAGES.get("grpo")()(b)
    out = samples(keep=0.5, scope="group")(b)
    kept = out.info["row"]
    by_group = {g: [r for r in kept if G[r] == g] for g in range(4)}
    assert by_group[0] == []
    assert by_group[1] == [8, 9, 10, 15]                  # 2 correct + the 2 first-indexed wrong rows
    for g in (1, 2, 3):
        rows = list(range(8 * g, 8 * g + 8))
        a = b.advantages[:, 0].tolist()
        nz = [r for r in rows if a[r] != 0]
        assert len(by_group[g]) == min(4, len(nz))
        best = max(pop_var([a[i] for i in c]) for c in itertools.combinations(nz, len(by_group[g])))
        assert pop_var([a[i] for i in by_group[g]]) == pytest.approx(best)


def test_cross_group_is_exact_over_the_batch_and_composes_with_tempo():
    rng = random.Random(1)
    S, T = 12, 4
    seqs = torch.randint(3, 6, (S, T))
    b = Batch(prompt_ids=[[1]] * S, response_ids=seqs, response_mask=torch.ones(S, T),
              group_ids=torch.tensor([i // 4 for i in range(S)]),
              rewards=torch.tensor([float(rng.random() < 0.5) for _ in range(S)]), info={"row": list(range(S))})
    b.rewards[:4] = torch.tensor([1.0, 0, 0, 1])
    ADVANTAGES.get("tempo")()(b)
    a = b.advantages.double().mean(-1)                     # per-row score = mean token advantage
    out = samples(keep=0.5)(b)
    kept = out.info["row"]
    nz = [i for i in range(S) if a[i] != 0]
    assert len(kept) == min(6, len(nz))
    best = max(pop_var([a[i].item() for i in c]) for c in itertools.combinations(nz, len(kept)))
    assert pop_var([a[i].item() for i in kept]) == pytest.approx(best)
    torch.testing.assert_close(out.advantages, b.advantages[kept])   # no re-normalisation


# ----------------------------------------------------------------- schedule
def test_schedule_interpolates_and_resumes():
    total = 11
    ctx = PluginContext(total_steps=total)
    f = D3SSamples(D3SSamples.Params(keep=0.25), ctx)
    w = D3STokens(D3STokens.Params(top_frac=0.2), ctx)
    sched = CONTROLLERS.get("d3s_schedule")(D3SSchedule.Params(samples_final=0.75, tokens_final=1.0), ctx)
    tr = SimpleNamespace(post_filters=[object(), f], token_weighting=[w], step_idx=0)
    seen = [(f.params.keep, w.params.top_frac)]
    for step in range(1, total):
        tr.step_idx = step
        m = sched.after_step(tr, {})
        seen.append((f.params.keep, w.params.top_frac))
        assert m["d3s/next_keep"] == f.params.keep and m["d3s/schedule_progress"] == pytest.approx(step / (total - 1))
    assert seen[0] == (0.25, 0.2)
    assert seen[-1] == pytest.approx((0.75, 1.0))          # the last step runs fully relaxed
    assert seen[5] == pytest.approx((0.5, 0.6))            # p = 0.5
    # the live values are checkpoint state: a fresh plugin restores them, the schedule still starts from the config
    f2 = D3SSamples(D3SSamples.Params(keep=0.25), ctx)
    f2.load_state_dict(f.state_dict())
    assert f2.params.keep == pytest.approx(0.75) and f2.initial_keep == 0.25
    with pytest.raises(RuntimeError, match="d3s_samples"):
        sched.after_step(SimpleNamespace(post_filters=[], token_weighting=[], step_idx=1), {})


def test_schedule_config_validation():
    from rlkit.config import ConfigError, load_config

    base = ["model.name_or_path=x", "reward.functions=[gsm8k_strict]"]
    cfg = load_config(base + ["algorithm.filters=[{name: d3s_samples, keep: 0.3, scope: group}]",
                              "algorithm.token_weighting=[{name: d3s_tokens, top_frac: 0.1}]",
                              "algorithm.controllers=[{name: d3s_schedule, samples_final: 0.9}]"])
    assert cfg.algorithm.controllers[0].name == "d3s_schedule"
    with pytest.raises(ConfigError, match="d3s_schedule"):
        load_config(base + ["algorithm.controllers=[d3s_schedule]"])
    with pytest.raises(ValueError, match="keep"):
        load_config(base + ["algorithm.filters=[{name: d3s_samples, keep: 1.5}]"])


def test_zero_entropy_tokens_fill_the_count():
    """Issue 10: zero-score tokens are kept when fewer than ceil(K * count) candidates score above 0 (the spec's
    stable top-ceil(K * count), ties by (row, position)); the docs said "only when K = 1"."""
    b = make_batch([1, 0], [0, 0], T=4, entropy=[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    b.advantages = torch.tensor([[1.0] * 4, [-1.0] * 4])
    b.token_weights = torch.ones(2, 4)
    tokens(top_frac=0.5)(b)                                   # ceil(0.5 * 8) = 4 of 8 candidates
    assert b.token_weights.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]   # (0,0) + three H = 0 tokens
    b.token_weights = torch.ones(2, 4)
    tokens(top_frac=0.5, scope="sequence")(b)                 # 2 per row: row 1 keeps two H = 0 tokens
    assert b.token_weights.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
