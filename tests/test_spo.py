"""SPO (arXiv 2505.23564): spec worked examples, MC batching, tree building, replay buffer, end to end."""
import math
import os

import pytest
import torch

from rlkit.algorithms.spo import (EXTRA_EDGE_ADV, EXTRA_PROMPT_VALUE, EXTRA_TERMINAL, EXTRA_VALUES, SPOProbMask,
                                  masked_whiten_global, prob_mask_advantages)
from rlkit.algorithms.spo_chain import SPOChainAdvantage, SPOChainRollout, chain_boundaries, chain_token_advantages
from rlkit.algorithms.spo_tree import (OnPolicyReplayBuffer, SPOTreeAdvantage, SPOTreeRollout, TreeNode, compute_tree_values,
                                       tree_edge_advantages)
from rlkit.batch import Batch
from rlkit.plugins import RolloutContext
from rlkit.rewarding import RewardResult
from rlkit.rollout.base import Completion, SamplingParams
from tests.conftest import REPO, launch_recipe, shared_path, tiny_overrides

P_SPEC = [0.95, 0.5, 0.99, 0.8, 0.97, 0.6, 0.98, 0.7, 0.99, 0.95]
A_PRE = [0, 0.2, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]
A_MASKED = [0, 0.2, 0, 0.2, 0, 0.4, 0, 0.4, 0, 0]


def _lp(ps):
    return [math.log(p) for p in ps]


def _chain_batch(ps, values, terminal, prompt_value=float("nan")):
    L = len(ps)
    v = torch.full((1, L), float("nan"))
    for c, x in values.items():
        v[0, c] = x
    return Batch(prompt_ids=[[1, 4]], response_ids=torch.full((1, L), 5), response_mask=torch.ones(1, L),
                 group_ids=torch.zeros(1, dtype=torch.long), rollout_logprobs=torch.tensor([_lp(ps)]),
                 rewards=torch.tensor([terminal]), truncated=torch.zeros(1, dtype=torch.bool),
                 extras={EXTRA_VALUES: v, EXTRA_TERMINAL: torch.tensor([terminal]), EXTRA_PROMPT_VALUE: torch.tensor([prompt_value])})


# ------------------------------------------------------------------ spec Sec. 2.6 chain example
def test_chain_spec_example_pre_mask_masked_whitened():
    assert chain_boundaries(_lp(P_SPEC), rho=0.9, interval=2) == [0, 4]
    assert chain_token_advantages(10, {0: 0.4, 4: 0.6}, 1.0, None) == pytest.approx(A_PRE)
    masked, loss_mask = prob_mask_advantages(torch.tensor([A_PRE]), torch.tensor([_lp(P_SPEC)]), torch.ones(1, 10), whiten=False)
    assert masked[0].tolist() == pytest.approx(A_MASKED)
    assert torch.nonzero(loss_mask[0]).flatten().tolist() == [1, 3, 5, 7]
    white, _ = prob_mask_advantages(torch.tensor([A_PRE]), torch.tensor([_lp(P_SPEC)]), torch.ones(1, 10))
    assert white[0].tolist() == pytest.approx([0, -0.866025, 0, -0.866025, 0, 0.866025, 0, 0.866025, 0, 0], abs=1e-5)

    # the same through the plugins: advantage spo_chain -> token weighting spo_prob_mask
    b = _chain_batch(P_SPEC, {0: 0.4, 4: 0.6}, 1.0)
    SPOChainAdvantage()(b)
    assert b.advantages[0].tolist() == pytest.approx(A_PRE)
    b.token_weights = torch.ones_like(b.response_mask)
    unwhitened = b.select([0])
    SPOProbMask(SPOProbMask.Params(whiten=False))(unwhitened)
    assert unwhitened.advantages[0].tolist() == pytest.approx(A_MASKED)
    SPOProbMask()(b)
    assert torch.nonzero(b.token_weights[0]).flatten().tolist() == [1, 3, 5, 7]
    sel = b.advantages[0, [1, 3, 5, 7]]
    assert sel.tolist() == pytest.approx([-0.866025, -0.866025, 0.866025, 0.866025], abs=1e-5)
    # loss averages over those 4 tokens only: token_mean with the masked weights
    from rlkit.objectives.aggregation import token_mean
    assert token_mean(torch.ones(1, 10), b.weights()).item() == pytest.approx(1.0)


class FakeRanks:
    """``world`` ranks as threads: ``reduce_for(rank)`` is a cross-rank all-reduce (sum / max) that blocks
    until every rank has contributed, like ``torch.distributed.all_reduce``."""

    def __init__(self, world):
        import threading

        self.world, self.barrier, self.slots = world, threading.Barrier(world, timeout=10), {}

    def reduce_for(self, rank):
        calls = iter(range(10 ** 6))

        def reduce(t, op):
            k = next(calls)
            self.slots[k, rank] = t.clone()
            self.barrier.wait()
            vals = torch.stack([self.slots[k, r] for r in range(self.world)])
            self.barrier.wait()
            return vals.sum(0) if op == "sum" else vals.max(0).values
        return reduce

    def run(self, fns):
        import threading

        out, errs = [None] * self.world, []

        def go(r):
            try:
                out[r] = fns[r](self.reduce_for(r))
            except Exception as e:  # pragma: no cover - surfaced below
                errs.append(e)
        ts = [threading.Thread(target=go, args=(r,)) for r in range(self.world)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs, errs
        return out


def test_whitening_is_cross_rank_fake_three_ranks():
    """The spec's chain example split over ranks: rank 0 holds masked advantages [0.2, 0.2], rank 1 [0.4, 0.4],
    rank 2 has no rows this step (it joins the collectives through join_empty).  Global whitening = the spec's
    single-batch numbers (mean 0.3, unbiased std 0.11547 -> -+0.866); per-rank whitening sees all-equal values on
    each rank and gives zeros."""
    ps = [[0.95, 0.5, 0.99, 0.8], [0.97, 0.6, 0.98, 0.7]]
    pre = [[0, 0.2, 0.2, 0.2], [0.4, 0.4, 0.4, 0.4]]

    def rank_batch(r):
        b = _chain_batch(ps[r], {}, 1.0)
        b.advantages = torch.tensor([pre[r]])
        b.token_weights = torch.ones_like(b.response_mask)
        return b

    def fn(r, scope):
        def call(reduce):
            w = SPOProbMask(SPOProbMask.Params(whiten_scope=scope))
            w.reduce = reduce if scope == "global" else None
            if r == 2:
                w.join_empty()
                return None
            b = rank_batch(r)
            w(b)
            return b
        return call

    g = FakeRanks(3).run([fn(r, "global") for r in range(3)])
    assert g[0].advantages[0].tolist() == pytest.approx([0, -0.866025, 0, -0.866025], abs=1e-5)
    assert g[1].advantages[0].tolist() == pytest.approx([0, 0.866025, 0, 0.866025], abs=1e-5)
    assert torch.nonzero(g[0].token_weights[0]).flatten().tolist() == [1, 3]
    for r in (0, 1):                                          # per rank: all-equal masked values -> zeros
        b = rank_batch(r)
        SPOProbMask(SPOProbMask.Params(whiten_scope="rank"))(b)
        assert torch.equal(b.advantages, torch.zeros(1, 4))
    # one rank holding everything = the single-process result (reduce over one rank is the identity)
    one = FakeRanks(1).run([lambda red: masked_whiten_global(torch.tensor([A_MASKED], dtype=torch.float64),
                                                              torch.tensor([[False, True, False, True, False, True, False, True, False, False]]), red)])
    assert one[0][0, [1, 3, 5, 7]].tolist() == pytest.approx([-0.866025, -0.866025, 0.866025, 0.866025], abs=1e-5)


def _gloo_rank(rank, world, init, out_dir):
    import torch.distributed as dist

    from rlkit.algorithms.spo import dist_reduce

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x = torch.tensor([[0.2, 0.2, 0.0]] if rank == 0 else [[0.4, 0.4, 0.0]], dtype=torch.float64)
        m = torch.tensor([[True, True, False]])
        torch.save(masked_whiten_global(x, m, dist_reduce("cpu")), os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_whitening_cross_rank_real_gloo_processes(tmp_path):
    """The same statistics with two real processes joined by gloo (torch.distributed.all_reduce)."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_gloo_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    assert r0[0].tolist() == pytest.approx([-0.866025, -0.866025, 0.0], abs=1e-5)
    assert r1[0].tolist() == pytest.approx([0.866025, 0.866025, 0.0], abs=1e-5)


def test_no_cutpoint_gives_zero_advantages_and_empty_loss_mask():
    ps = [0.95, 0.99, 0.97, 0.92]
    assert chain_boundaries(_lp(ps), 0.9, 1) == []
    b = _chain_batch(ps, {}, 1.0)
    SPOChainAdvantage()(b)
    assert torch.equal(b.advantages, torch.zeros(1, 4))
    b.token_weights = torch.ones_like(b.response_mask)
    SPOProbMask()(b)
    assert torch.equal(b.advantages, torch.zeros(1, 4)) and b.token_weights.sum() == 0


def test_prompt_boundary_and_prompt_value_options():
    ps = [0.5, 0.95, 0.6, 0.99]                       # low at 0 and 2 -> boundaries -1 and 1 (interval 1)
    assert chain_boundaries(_lp(ps), 0.9, 1) == [-1, 1]
    # code: V(prompt) is the base only when -1 is a boundary
    assert chain_token_advantages(4, {1: 0.5}, 1.0, 0.25) == pytest.approx([0.25, 0.25, 0.5, 0.5])
    # the code quirk: no prompt value -> the stretch up to the first boundary gets 0
    assert chain_token_advantages(4, {1: 0.5}, 1.0, None) == pytest.approx([0, 0, 0.5, 0.5])
    # NaN terminal (reward skipped) -> zeros; NaN boundary value -> that boundary is skipped
    assert chain_token_advantages(4, {1: 0.5}, float("nan"), 0.1) == [0.0] * 4
    assert chain_token_advantages(4, {1: float("nan")}, 1.0, 0.25) == pytest.approx([0.75] * 4)


# --------------------------------------------------------------------------- fakes for strategies
class FakeEngine:
    """Deterministic engine: ``script(call_index, prompt_index, prompt, j, sampling) -> (tokens, probs)``."""

    def __init__(self, script, tok, eos=2):
        self.script, self.tok, self.eos, self.calls = script, tok, eos, []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append(([list(p) for p in prompt_ids], n, sampling))
        out = []
        for i, p in enumerate(prompt_ids):
            row = []
            for j in range(n):
                toks, probs = self.script(len(self.calls) - 1, i, list(p), j, sampling)
                toks, probs = toks[: sampling.max_new_tokens], probs[: sampling.max_new_tokens]
                fin = "stop" if toks and toks[-1] == self.eos else "length"
                row.append(Completion(token_ids=toks, logprobs=_lp(probs), finish_reason=fin,
                                      text=self.tok.decode(toks, skip_special_tokens=True)))
            out.append(row)
        return out


class FakeRewarder:
    """reward = fraction of 'a' in the first 4 characters of the completion text."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids=None, columns=None, group_ids=None, **kw):
        self.calls.append(list(completions))
        r = torch.tensor([sum(ch == "a" for ch in c[:4]) / 4 for c in completions], dtype=torch.float32)
        return RewardResult(r, {"a": r.clone()}, {})


@pytest.fixture(scope="module")
def tok():
    from rlkit.toy import make_tokenizer

    return make_tokenizer()


def _ids(tok, s):
    return tok.convert_tokens_to_ids(list(s))


def _rctx(engine, rewarder, tok, spp=3, max_new=6, step=1):
    counter = iter(range(1000))
    return RolloutContext(engine=engine, rewarder=rewarder, sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new),
                          samples_per_prompt=spp, tokenizer=tok, step=step,
                          alloc_groups=lambda n: [next(counter) for _ in range(n)], pad_id=0)


# ------------------------------------------------------------------------- chain: MC batching
def test_chain_mc_states_are_batched_in_one_engine_call(tok):
    b6, c6, e = _ids(tok, "bbbbbb"), _ids(tok, "cccccc"), tok.eos_token_id
    a, d = _ids(tok, "a")[0], _ids(tok, "d")[0]

    def script(call, i, prompt, j, sampling):
        if call == 0:    # main rollouts: s0 = s2 = bbbbbb (spec-like probs), s1 = cccccc (all low-prob)
            return ([b6, c6, b6][j], [[0.95, 0.5, 0.99, 0.8, 0.97, 0.6], [0.5] * 6, [0.95, 0.5, 0.99, 0.8, 0.97, 0.6]][j])
        # MC continuations: 'a' + EOS when (i + j) is even, else 'd' 'd' EOS
        return ([a, e], [0.5, 0.5]) if (i + j) % 2 == 0 else ([d, d, e], [0.5] * 3)

    rows = [{"prompt": "xy:", "prompt_ids": [1] + _ids(tok, "xy:"), "answer": "a"},
            {"prompt": "zz:", "prompt_ids": [1] + _ids(tok, "zz:"), "answer": "a"}]
    eng, rw = FakeEngine(script, tok), FakeRewarder()
    strat = SPOChainRollout(SPOChainRollout.Params(interval=2, mc_samples=3))
    batch = strat(rows, _rctx(eng, rw, tok))

    # exactly two engine calls per step: the group, then every boundary state of every sample at once
    assert len(eng.calls) == 2
    prefixes, n, sp = eng.calls[1]
    assert n == 3 and sp.max_new_tokens == 6
    # s0/s2 (identical, deduplicated): boundaries {0, 4}; s1: {-1 (prompt), 1, 3}; for both rows
    expect = []
    for r in rows:
        expect += [r["prompt_ids"] + b6[:1], r["prompt_ids"] + b6[:5], r["prompt_ids"], r["prompt_ids"] + c6[:2], r["prompt_ids"] + c6[:4]]
    assert prefixes == expect
    # V(state k) = mean over j of [(k + j) even] * reward; the state 'bbbbb' has a 1-token budget
    vals = batch.extras[EXTRA_VALUES]
    V = lambda k: sum(((k + j) % 2 == 0) * 0.25 for j in range(3)) / 3  # noqa: E731  'a' in the first 4 chars
    assert vals[0, 0].item() == pytest.approx(V(0)) and vals[2, 0].item() == pytest.approx(V(0))
    # 'bbbbb' + 'a' -> 'a' is the 6th char: outside the first 4 -> 0
    assert vals[0, 4].item() == pytest.approx(0.0)
    assert torch.isnan(vals[0, [1, 2, 3, 5]]).all()
    assert vals[1, 1].item() == pytest.approx(V(3)) and vals[1, 3].item() == pytest.approx(0.0)
    assert batch.extras[EXTRA_PROMPT_VALUE][1].item() == pytest.approx(V(2))   # boundary -1 -> V(prompt)
    assert torch.isnan(batch.extras[EXTRA_PROMPT_VALUE][0])
    # rewarder: one call for the group and one for all MC continuations (scored on prefix + continuation)
    assert len(rw.calls) == 2 and len(rw.calls[1]) == 10 * 3
    assert rw.calls[1][0] == "ba" and rw.calls[1][3] == "bbbbbd"      # cut to the 1-token budget
    m = strat.metrics()
    assert m["spo/mc_states"] == 10
    assert m["spo/extra_generated_tokens"] > 0
    assert m["spo/tokens_generated_per_trained_token"] == pytest.approx((36 + m["spo/extra_generated_tokens"]) / 36)

    # advantages of s1 (prompt boundary, interval 2): boundaries -1, 1, 3 -> A = V1 - V(prompt), V3 - V1, R - V3
    SPOChainAdvantage()(batch)
    A = batch.advantages[1].tolist()
    v0, v1, v3, R = V(2), V(3), 0.0, 0.0
    assert A == pytest.approx([v1 - v0] * 2 + [v3 - v1] * 2 + [R - v3] * 2)


def test_chain_prompt_value_modes_and_unfinished_penalty(tok):
    b6, e = _ids(tok, "abbbbb"), tok.eos_token_id
    a = _ids(tok, "a")[0]

    def script(call, i, prompt, j, sampling):
        if call == 0:
            return b6, [0.95, 0.95, 0.5, 0.95, 0.95, 0.95]           # one cut point: boundary 1
        return [a] * 8, [0.5] * 8                                   # never finishes: truncated at the budget

    rows = [{"prompt": "xy:", "prompt_ids": [1] + _ids(tok, "xy:"), "answer": "a"}]
    for mode, n_states in (("code_quirk", 1), ("mc", 2), ("group_mean", 1)):
        eng = FakeEngine(script, tok)
        strat = SPOChainRollout(SPOChainRollout.Params(interval=1, mc_samples=2, prompt_value=mode))
        b = strat(rows, _rctx(eng, FakeRewarder(), tok, spp=2))
        assert len(eng.calls[1][0]) == n_states
        v0 = b.extras[EXTRA_PROMPT_VALUE]
        if mode == "code_quirk":
            assert torch.isnan(v0).all()
        elif mode == "mc":
            assert v0.tolist() == pytest.approx([1.0, 1.0])        # 'aaaa...' continuations
        else:
            assert v0.tolist() == pytest.approx([0.25, 0.25])      # the group's mean reward
    # unfinished_reward = 0: truncated continuations and truncated responses are worth 0
    eng = FakeEngine(script, tok)
    strat = SPOChainRollout(SPOChainRollout.Params(interval=1, mc_samples=2, unfinished_reward=0.0))
    b = strat(rows, _rctx(eng, FakeRewarder(), tok, spp=2))
    assert b.extras[EXTRA_VALUES][0, 1].item() == 0.0
    assert b.extras[EXTRA_TERMINAL].tolist() == [0.0, 0.0] and b.rewards.tolist() == [0.25, 0.25]


# --------------------------------------------------------------------- spec Sec. 2.6 tree example
def _spec_tree():
    root = TreeNode(row=0)
    a, b = root.add(TreeNode(tokens=[4])), root.add(TreeNode(tokens=[5]))
    a1, a2 = a.add(TreeNode(tokens=[6], value=1.0)), a.add(TreeNode(tokens=[7], value=0.0))
    b1, b2 = b.add(TreeNode(tokens=[8], value=0.0)), b.add(TreeNode(tokens=[9], value=0.0))
    return root, a, b, a1, a2, b1, b2


def test_tree_spec_example_rloo_and_grpo():
    root, a, b, a1, a2, b1, b2 = _spec_tree()
    compute_tree_values(root)
    assert (a.value, b.value, root.value) == (0.5, 0.0, 0.25)
    edges = [(p, c, pytest.approx(x)) for p, c, x in tree_edge_advantages(root, "rloo")]
    assert edges == [(root, a, 0.25), (a, a1, 0.5), (a, a2, -0.5), (root, b, -0.25)]   # b1, b2: A = 0, dropped
    grpo = {id(c): x for _, c, x in tree_edge_advantages(root, "grpo")}
    assert [grpo[id(n)] for n in (a, b, a1, a2)] == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-6)
    assert id(b1) not in grpo and id(b2) not in grpo
    # internal value = mean of the children's values (not of the leaves) for an unbalanced tree
    r2 = TreeNode(row=0)
    x = r2.add(TreeNode(tokens=[4], value=1.0))                 # early leaf
    y = r2.add(TreeNode(tokens=[5]))
    for v in (0.0, 0.0, 1.0):
        y.add(TreeNode(tokens=[6], value=v))
    compute_tree_values(r2)
    assert r2.value == pytest.approx((1.0 + 1 / 3) / 2) and x.is_leaf


def test_tree_strategy_builds_levels_in_batched_calls(tok):
    e = tok.eos_token_id
    a, d = _ids(tok, "a")[0], _ids(tok, "d")[0]

    def script(call, i, prompt, j, sampling):
        if call == 0:   # level 0 (M = 2): child 0 of every root finishes early ('a' EOS), child 1 continues
            return ([a, e], [0.5, 0.5]) if j == 0 else ([d, d, d], [0.5] * 3)
        # level 1 (last, budget 6 - 2 = 4): 'aa' + EOS for j == 0, 'dd' + EOS for j == 1
        return ([a, a, e], [0.5] * 3) if j == 0 else ([d, d, e], [0.5] * 3)

    rows = [{"prompt": f"q{k}:", "prompt_ids": [1] + _ids(tok, f"q{k}:"), "answer": "a"} for k in range(3)]
    eng, rw = FakeEngine(script, tok), FakeRewarder()
    strat = SPOTreeRollout(SPOTreeRollout.Params(branching=[2, 2], segment_tokens=2, replay=False))
    batch = strat(rows, _rctx(eng, rw, tok, max_new=6))
    # one engine call per level, over all prompts
    assert len(eng.calls) == 2
    assert eng.calls[0][0] == [r["prompt_ids"] for r in rows] and eng.calls[0][2].max_new_tokens == 2
    assert eng.calls[1][0] == [r["prompt_ids"] + [d, d] for r in rows] and eng.calls[1][2].max_new_tokens == 4
    assert len(rw.calls) == 1 and sorted(set(rw.calls[0])) == ["a", "ddaa", "dddd"]
    # values: early leaf 'a' = 0.25; internal 'dd' = mean(0.5, 0) = 0.25 -> root children equal -> dropped;
    # the internal node's children: +0.25 / -0.25
    assert len(batch) == 2 * 3
    assert batch.extras[EXTRA_EDGE_ADV].tolist() == pytest.approx([0.25, -0.25] * 3)
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]     # edges share their prompt's group id
    assert [p[-2:] for p in batch.prompt_ids] == [[d, d]] * 6 # prompt = question + parent path
    assert batch.truncated.tolist() == [False] * 6
    SPOTreeAdvantage()(batch)
    assert batch.advantages[0].tolist() == pytest.approx([0.25] * 3)
    m = strat.metrics()
    assert m["spo/tree_edges"] == 12 and m["spo/edges_nonzero"] == 6 and m["spo/generated_tokens"] == 3 * (2 + 2 + 3 + 3)

    # with replay: one edge per question per step; left-over edges come back next step with their birth step
    # (out of the gap check) and their generation-time log-probs as PPO "old" log-probs (code behaviour)
    strat = SPOTreeRollout(SPOTreeRollout.Params(branching=[2, 2], segment_tokens=2, replay_edges_per_question=1))
    assert strat.needs == {"old_logprobs"}
    b1 = strat(rows, _rctx(FakeEngine(script, tok), FakeRewarder(), tok, max_new=6, step=1))
    assert len(b1) == 3 and len(strat.buffer) == 3 and b1.extras["rollout_step"].tolist() == [1.0] * 3
    rows2 = [{"prompt": f"r{k}:", "prompt_ids": [1] + _ids(tok, f"r{k}:"), "answer": "a"} for k in range(3)]
    b2 = strat(rows2, _rctx(FakeEngine(script, tok), FakeRewarder(), tok, max_new=6, step=2))
    born = b2.extras["rollout_step"]
    assert len(b2) == 6 and len(strat.buffer) == 3 and (born == 1).sum() == 3   # 3 old questions + 3 new ones
    assert torch.equal(b2.extras["keep_old_logprobs"], (born != 2).float())
    assert torch.equal(b2.old_logprobs, b2.rollout_logprobs)
    assert strat.metrics()["spo/edges_replayed"] == float((born != 2).sum())


# ------------------------------------------------------------------------------- replay buffer
def _edges(q, n):
    return [{"question": q, "id": i} for i in range(n)]


def test_replay_buffer_caps_per_question_keeps_unused_and_ages_out():
    buf = OnPolicyReplayBuffer(max_age=8, per_question=32, seed=0)
    buf.add_edges(_edges("q1", 40) + _edges("q2", 5), iteration=1)
    got, removed = buf.get_edges(1)
    assert removed == 0 and len(got) == 32 + 5
    assert sum(e["question"] == "q1" for e in got) == 32
    assert len(buf) == 8 and all(e["question"] == "q1" for e in buf.edges)   # unused edges stay
    got2, _ = buf.get_edges(2)
    assert len(got2) == 8 and len(buf) == 0
    assert {e["id"] for e in got + got2 if e["question"] == "q1"} == set(range(40))
    # aging: edges of iteration 1 are dropped at iteration 9 (9 - 1 >= 8), kept at iteration 8
    buf.add_edges(_edges("q3", 40), iteration=1)
    buf.get_edges(1)                                 # 8 left over
    got, removed = buf.get_edges(9)
    assert removed == 8 and got == [] and len(buf) == 0
    buf.add_edges(_edges("q4", 40), iteration=1)
    buf.get_edges(1)
    got, removed = buf.get_edges(8)
    assert removed == 0 and len(got) == 8


def test_replay_buffer_state_dict_resumes_identically():
    a = OnPolicyReplayBuffer(seed=3)
    a.add_edges(_edges("q", 100), iteration=0)
    a.get_edges(0)
    state = a.state_dict()
    b = OnPolicyReplayBuffer(seed=99)
    b.load_state_dict(state)
    assert [e["id"] for e in a.get_edges(1)[0]] == [e["id"] for e in b.get_edges(1)[0]]
    # through the strategy plugin (what the trainer checkpoints)
    s = SPOTreeRollout(SPOTreeRollout.Params(branching=[2]))
    s.buffer.add_edges(_edges("q", 3), 5)
    s2 = SPOTreeRollout(SPOTreeRollout.Params(branching=[2]))
    s2.load_state_dict(s.state_dict())
    assert len(s2.buffer) == 3 and s2.buffer.edges[0]["iteration"] == 5


def test_config_checks(tmp_path):
    from rlkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.strategy: spo_chain"):
        load_config(tiny_overrides(tmp_path, **{"algorithm.advantage": "spo_chain"}))
    with pytest.raises(ConfigError, match="segment_tokens"):
        load_config(tiny_overrides(tmp_path, **{"algorithm.advantage": "spo_tree",
                                                "rollout.strategy": "{name: spo_tree, branching: [2, 2, 2], segment_tokens: 3}"}))


# ------------------------------------------------------------------------------ end to end (HF engine)
def _spy_engine(tr):
    calls = []
    orig = tr.engine.generate

    def gen(prompt_ids, n, sampling):
        calls.append(([list(p) for p in prompt_ids], n, sampling.max_new_tokens))
        return orig(prompt_ids, n, sampling)

    tr.engine.generate = gen
    return calls


def test_chain_tiny_trainer_prefix_continuations(tmp_path, echo_rows):
    from rlkit.trainer import Trainer
    from rlkit.config import load_config

    cfg = load_config(tiny_overrides(tmp_path, **{
        "rollout.strategy": "{name: spo_chain, interval: 2, mc_samples: 2}", "algorithm.advantage": "spo_chain",
        "algorithm.aggregation": "token_mean", "algorithm.token_weighting": "[spo_prob_mask]",
        "trainer.total_steps": 2, "trainer.ppo_epochs": 2}))
    tr = Trainer(cfg, train_rows=echo_rows)
    calls = _spy_engine(tr)
    prompts = {tuple(r["prompt_ids"]) for r in tr.train_rows}
    m = tr.step()
    assert len(calls) == 2 and calls[0][1] == 4 and calls[1][1] == 2
    assert any(tuple(p) not in prompts for p in calls[1][0])     # continuations from prompt + response prefix
    assert m["spo/extra_generated_tokens"] > 0 and m["spo/tokens_generated_per_trained_token"] > 1
    assert m["logprob_gap/mean"] < 1e-4                           # rollout log-probs = trainer's (cut points)
    assert 0 < m["train/kept_token_frac"] <= 1


def test_tree_tiny_trainer_edges_and_checkpointed_buffer(tmp_path, echo_rows):
    from rlkit.trainer import Trainer
    from rlkit.config import load_config

    cfg = load_config(tiny_overrides(tmp_path, **{
        "rollout.strategy": "{name: spo_tree, branching: [2, 2], segment_tokens: 3, replay_edges_per_question: 3}",
        "algorithm.advantage": "spo_tree", "algorithm.aggregation": "token_mean",
        "algorithm.token_weighting": "[spo_prob_mask]", "trainer.total_steps": 2}))
    tr = Trainer(cfg, train_rows=echo_rows)
    calls = _spy_engine(tr)
    for _ in range(2):
        m = tr.step()
    assert [c[2] for c in calls] == [3, 3, 3, 3]                  # level budgets: M, then max_new_tokens - M
    level0 = {tuple(p) for p in calls[0][0]}
    assert all(tuple(p[:-3]) in level0 for p in calls[1][0])      # level 2 continues prompt + parent path
    assert m["spo/tree_leaves"] > 0 and "spo/replay_size" in m
    ck = tr.save_checkpoint()
    state = torch.load(os.path.join(ck, "rlkit.pt"), weights_only=False)["plugins"]["strategy"]["buffer"]
    assert len(state["edges"]) == len(tr.strategy.buffer) and "rng" in state


def test_spo_chain_recipe_tiny_reward_rises(tmp_path, toy_model_dir):
    """Launched the way users launch: python launch/train.py recipe=... profile=tiny."""
    m, _ = launch_recipe("spo_chain_gsm8k", tmp_path)
    r = [x["reward/mean"] for x in m]
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.1, r
    assert all(x["spo/tokens_generated_per_trained_token"] > 1 for x in m)


# ----------------------------------------------------- mechanisms on the pretrained stories260K (../shared)
# On the toy model every sampled token has p < 0.9 (a near-uniform policy), so the probability mask keeps
# everything; the pretrained TinyStories model is confident on many tokens, which is where the mask acts.
STORY_PROMPTS = ["Once upon a time, there was a little girl named Lily.", "One day, a boy named Tom went to the park.",
                 "The sun was shining and the birds were singing.", "There was a big dog who liked to play."]


def _story_trainer(tmp_path, **over):
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    model = shared_path("models", "stories260K-hf")
    base = {"model.name_or_path": str(model), "data.prompt_field": "question", "data.answer_field": "answer",
            "data.max_prompt_tokens": 32, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 10,
            "reward.functions": f"[{REPO / 'tests' / 'story_rewards.py'}:the_frac]", "trainer.prompts_per_step": 2,
            "trainer.total_steps": 2, "trainer.lr": 1e-3, "trainer.output_dir": str(tmp_path), "trainer.run_name": "s",
            "trainer.progress_bar": False, "trainer.log_with": [], "trainer.save_final": False,
            "algorithm.aggregation": "token_mean", "algorithm.token_weighting": "[spo_prob_mask]"}
    base.update(over)
    rows = [{"question": p, "answer": "the"} for p in STORY_PROMPTS]
    return Trainer(load_config([f"{k}={v}" for k, v in base.items()]), train_rows=rows)


def _spy_updates(tr):
    """Record the batch of every update (advantages and token weights are final there)."""
    seen = []
    orig = tr._update

    def upd(batch, ms):
        seen.append(batch)
        return orig(batch, ms)

    tr._update = upd
    return seen


def test_prob_mask_acts_on_pretrained_model_chain(tmp_path):
    """SPO-chain on stories260K: the trained tokens are exactly those with p < 0.9 (the kept token fraction is
    below 1), the masked-out tokens carry advantage 0, and the kept advantages are whitened (mean 0, std 1)."""
    tr = _story_trainer(tmp_path, **{"rollout.strategy": "{name: spo_chain, interval: 1, mc_samples: 2}",
                                     "algorithm.advantage": "spo_chain"})
    seen = _spy_updates(tr)
    fracs = [tr.step()["train/kept_token_frac"] for _ in range(2)]
    assert all(0 < f < 1 for f in fracs), fracs
    for b in seen:
        live = b.response_mask > 0
        low = live & (torch.exp(b.rollout_logprobs) < 0.9)
        assert 0 < low.sum() < live.sum()
        assert torch.equal(b.weights() > 0, low)                       # loss exactly on the p < 0.9 tokens
        assert (b.advantages[live & ~low] == 0).all()
        kept = b.advantages[low].double()
        assert kept.mean().item() == pytest.approx(0.0, abs=1e-5) and kept.std().item() == pytest.approx(1.0, abs=1e-3)


def test_interval_subsamples_cut_points_on_pretrained_model(tmp_path):
    """interval = 3 keeps every third cut point of the same rollouts (same seed, same weights at step 1): the
    boundaries valued by MC are exactly interval-1's boundaries[::3], and fewer states are generated."""
    got = {}
    for k in (1, 3):
        tr = _story_trainer(tmp_path / f"i{k}", **{"rollout.strategy": f"{{name: spo_chain, interval: {k}, mc_samples: 2}}",
                                                   "algorithm.advantage": "spo_chain", "trainer.total_steps": 1})
        seen = _spy_updates(tr)
        m = tr.step()
        b = seen[0]
        vals = b.extras[EXTRA_VALUES]
        bnds = []
        for s in range(len(b)):
            c = torch.nonzero(~torch.isnan(vals[s])).flatten().tolist()
            if not math.isnan(float(b.extras[EXTRA_PROMPT_VALUE][s])):
                c = [-1] + c
            bnds.append(c)
        got[k] = (b.response_ids.tolist(), bnds, m["spo/mc_states"])
    assert got[1][0] == got[3][0]                                       # the same rollouts
    assert any(len(c) > 1 for c in got[1][1])
    assert got[3][1] == [c[::3] for c in got[1][1]]
    assert got[3][2] < got[1][2]


def test_tree_replay_used_on_pretrained_model(tmp_path):
    """SPO-tree on stories260K: edges left in the buffer are trained at a later step (edges_replayed > 0),
    with their generation-time log-probs as the PPO old log-probs, and the probability mask acts on edges."""
    tr = _story_trainer(tmp_path, **{
        "rollout.strategy": "{name: spo_tree, branching: [3, 3], segment_tokens: 4, replay_edges_per_question: 2}",
        "algorithm.advantage": "spo_tree", "trainer.total_steps": 3})
    seen = _spy_updates(tr)
    ms = [tr.step() for _ in range(3)]
    assert sum(m["spo/edges_replayed"] for m in ms) > 0, [m["spo/edges_replayed"] for m in ms]
    assert any(m["train/kept_token_frac"] < 1 for m in ms)
    old = [b for b in seen if (b.extras["rollout_step"] < b.extras["rollout_step"].max()).any()]
    assert old
    for b in old:
        rep = b.extras["keep_old_logprobs"] > 0
        assert rep.any() and torch.equal(b.old_logprobs[rep], b.rollout_logprobs[rep])
