"""EFRame: exploration round, filter, pending buffer, replay, log-prob temperature, trainer hooks, e2e."""

import pytest
import torch

from rlkit.algorithms.eframe import EFRameFilter, EFRameRollout, RowFIFO, row_advantages
from rlkit.batch import Batch
from rlkit.config import RewardConfig, load_config
from rlkit.objectives.grpo import GRPO
from rlkit.plugins import PluginContext, RolloutContext
from rlkit.rewarding import Rewarder
from rlkit.rollout.base import Completion, SamplingParams
from tests.conftest import REPO, launch_recipe, tiny_overrides

A_POS, A_NEG = 1.095443, -0.730295          # spec 1.6: group [1,1,0,0,0]
EX_POS, EX_NEG = 2.320195, -0.409446        # spec 1.6: 3 of 20 correct


# ------------------------------------------------------------------ fakes
class ScriptedEngine:
    """Returns scripted completions: outcomes[(prompt, temperature)] = list of "1"/"0" strings."""

    def __init__(self, outcomes, truncated=()):
        self.outcomes, self.truncated, self.calls = outcomes, set(truncated), []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((len(prompt_ids), n, sampling.temperature))
        out = []
        for pid in prompt_ids:
            key = (tuple(pid), round(sampling.temperature, 3))
            texts = self.outcomes[key]
            assert len(texts) == n, (key, n)
            out.append([Completion(token_ids=[10 + int(t), 2], logprobs=[-1.0, -0.5],
                                   finish_reason="length" if (key, j) in self.truncated else "stop", text=t)
                        for j, t in enumerate(texts)])
        return out


def correct(completions, **kw):
    return [float(c == "1") for c in completions]


def make_rctx(engine, n=5, temperature=1.0):
    counter = {"next": 0}

    def alloc(k):
        ids = list(range(counter["next"], counter["next"] + k))
        counter["next"] += k
        return ids

    return RolloutContext(engine=engine, rewarder=Rewarder(RewardConfig(), functions=[correct]),
                          sampling=SamplingParams(temperature=temperature), samples_per_prompt=n, tokenizer=None,
                          alloc_groups=alloc, pad_id=0)


P1, P2, P3 = (1, 3), (1, 4), (1, 5)
ROWS = [{"prompt_ids": list(p), "prompt": name, "answer": "1"} for p, name in ((P1, "P1"), (P2, "P2"), (P3, "P3"))]


def worked_example_outcomes():
    return {(P1, 1.0): ["0"] * 5, (P2, 1.0): ["1", "1", "0", "0", "0"], (P3, 1.0): ["1"] * 5,
            (P1, 1.2): ["1"] * 3 + ["0"] * 17}


def rollout_and_advantage(strategy, rows, rctx):
    b = strategy(rows, rctx)
    GRPO()(b)
    return b


# --------------------------------------------------------- worked example
def test_worked_example_spec_1_6():
    """P1 all wrong (hard: explored), P2 [1,1,0,0,0], P3 all right; 20 extra samples on P1 with 3 correct; IBS = 15."""
    eng = ScriptedEngine(worked_example_outcomes())
    rctx = make_rctx(eng)
    strat = EFRameRollout()
    b = rollout_and_advantage(strat, ROWS, rctx)
    # one exploration call: 1 hard prompt x 20 samples at T = 1.2; fresh group id
    assert eng.calls == [(3, 5, 1.0), (1, 20, 1.2)]
    assert len(b) == 15 + 20
    ex = b.extras["explore"].bool()
    assert ex.sum() == 20 and not ex[:15].any()
    assert set(b.group_ids[ex].tolist()) == {3} and set(b.group_ids[~ex].tolist()) == {0, 1, 2}
    assert b.info["temperature"][0] == 1.0 and b.info["temperature"][-1] == 1.2
    assert "logprob_temperature" not in b.extras          # "train" treatment: the trainer's temperature for every row
    m = strat.metrics()
    assert m["eframe/hard_prompts"] == 1 and m["eframe/explore_samples"] == 20 and m["eframe/explore_solved_frac"] == 1.0
    # GRPO advantages (eps 1e-6), grouped within the exploration round only
    A = row_advantages(b)
    assert torch.allclose(A[0:5], torch.zeros(5)) and torch.allclose(A[10:15], torch.zeros(5))
    torch.testing.assert_close(A[5:10], torch.tensor([A_POS, A_POS, A_NEG, A_NEG, A_NEG]), atol=1e-5, rtol=0)
    torch.testing.assert_close(A[15:], torch.tensor([EX_POS] * 3 + [EX_NEG] * 17), atol=1e-5, rtol=0)

    f = EFRameFilter(EFRameFilter.Params(train_batch_size=15), PluginContext())
    assert f.rescore_after and f.stage == "post_advantage"
    out = f(b)
    assert out is None                                    # pending = 8 < IBS = 15: no update this step
    fm = f.metrics()
    assert fm["eframe/filter_kept"] == 8 and fm["eframe/explore_kept"] == 3 and fm["eframe/normal_kept"] == 5
    assert fm["eframe/pending_rows"] == 8 and fm["eframe/train_rows"] == 0 and fm["eframe/explore_yield"] == 3 / 20
    assert fm["eframe/filter_rate"] == pytest.approx(1 - 8 / 35)
    pend = f.pending.rows                                 # merged batch: exploration survivors first, then P2
    torch.testing.assert_close(row_advantages(pend), torch.tensor([EX_POS] * 3 + [A_POS] * 2 + [A_NEG] * 3), atol=1e-5, rtol=0)

    # next step: two more P2-like prompts (10 rows kept) -> 18 pending -> the oldest 15 are trained
    rows2 = [{"prompt_ids": [2, k], "prompt": f"Q{k}", "answer": "1"} for k in (6, 7)]
    eng.outcomes.update({((2, 6), 1.0): ["1", "1", "0", "0", "0"], ((2, 7), 1.0): ["1", "1", "0", "0", "0"]})
    b2 = rollout_and_advantage(strat, rows2, rctx)
    assert strat.metrics()["eframe/explore_samples"] == 0 and len(eng.calls) == 3   # no hard prompt: round skipped
    out = f(b2)
    assert len(out) == 15 and len(f.pending) == 3
    assert out.info["prompt"][:8] == ["P1"] * 3 + ["P2"] * 5 and out.info["prompt"][8:] == ["Q6"] * 5 + ["Q7"] * 2
    assert not (out.extras["keep_old_logprobs"] > 0).any()
    # spec order: the rows trained at this step enter replay before this step's replay check
    assert f.metrics()["eframe/replay_admitted"] == 9 and len(f.replay) == 9
    assert not (f.replay.rows.extras["keep_old_logprobs"] > 0).any()    # provisional until rescored
    # the trainer re-scores the returned rows in place (rescore_after); the next call stores those values
    out.old_logprobs = torch.full_like(out.response_mask, -0.25) * out.response_mask
    eng.outcomes[(P3, 1.0)] = ["1"] * 5
    assert f(rollout_and_advantage(strat, [ROWS[2]], rctx)) is None     # step 3 (nothing kept)
    assert f.metrics()["eframe/replay_admitted"] == 0
    rep = f.replay.rows
    # |A| > 1 rows of the trained 15: P1's 3 exploration positives, P2's 2 positives (P2's negatives, |A| = 0.73, stay
    # out) and the positives of Q6 and Q7 among the trained rows
    assert rep.info["prompt"] == ["P1"] * 3 + ["P2"] * 2 + ["Q6"] * 2 + ["Q7"] * 2
    assert torch.all(rep.old_logprobs[rep.response_mask > 0] == -0.25)   # stored at first training
    assert torch.all(rep.extras["keep_old_logprobs"] == 1) and rep.token_weights is None


def test_truncated_positive_dropped_and_negative_kept():
    outcomes = {(P2, 1.0): ["1", "1", "0", "0", "0"]}
    eng = ScriptedEngine(outcomes, truncated={((P2, 1.0), 0), ((P2, 1.0), 2)})   # a positive and a negative hit the cap
    b = rollout_and_advantage(EFRameRollout(), [ROWS[1]], make_rctx(eng))
    f = EFRameFilter(EFRameFilter.Params(train_batch_size=4), PluginContext())
    out = f(b)
    assert f.metrics()["eframe/truncated_pos_dropped"] == 1
    assert len(out) == 4 and out.truncated.tolist() == [False, True, False, False]


def _synthetic(n_rows, adv, step_tag):
    """n_rows rows with constant per-row advantages ``adv`` [n] and a tag in info."""
    T = 3
    return Batch(prompt_ids=[[1]] * n_rows, response_ids=torch.ones(n_rows, T, dtype=torch.long),
                 response_mask=torch.ones(n_rows, T), group_ids=torch.arange(n_rows),
                 rewards=torch.zeros(n_rows), truncated=torch.zeros(n_rows, dtype=torch.bool),
                 rollout_logprobs=torch.full((n_rows, T), -1.0), old_logprobs=torch.full((n_rows, T), -1.0),
                 advantages=torch.tensor(adv, dtype=torch.float32)[:, None].expand(n_rows, T).clone(),
                 info={"tag": [f"{step_tag}:{i}" for i in range(n_rows)]})


def test_pending_fifo_cap_and_multiple_of_ibs():
    f = EFRameFilter(EFRameFilter.Params(train_batch_size=4, replay=False), PluginContext())
    assert f(_synthetic(3, [0.5] * 3, "a")) is None
    out = f(_synthetic(4, [0.5] * 4, "b"))                 # 7 pending -> floor(7/4)*4 = 4 trained (the oldest), 3 left
    assert len(out) == 4 and len(f.pending) == 3 and out.info["tag"] == ["a:0", "a:1", "a:2", "b:0"]
    out = f(_synthetic(12, [0.5] * 12, "c"))               # 15 > cap 2*IBS = 8: the oldest 7 dropped, then 8 trained
    assert f.metrics()["eframe/pending_overflow"] == 7 and f.metrics()["eframe/train_rows"] == 8
    assert out.info["tag"] == [f"c:{i}" for i in range(4, 12)]
    assert len(f.pending) == 0


def test_replay_every_freq_all_if_full_else_random_multiple():
    f = EFRameFilter(EFRameFilter.Params(train_batch_size=2, replay_freq=2, replay_size=3.0), PluginContext())
    assert f.replay.capacity == 6
    # step 1: 2 rows trained, both |A| > 1 (one negative): they enter replay at once (spec order); not due yet
    out = f(_synthetic(2, [1.5, -1.2], "s1"))
    assert len(out) == 2 and f.metrics()["eframe/replay_rows"] == 0 and f.metrics()["eframe/replay_admitted"] == 2
    out.old_logprobs = torch.full_like(out.old_logprobs, -0.7)   # what the trainer's rescore writes
    # step 2 (due: freq 2): s2:1 (A=3) is admitted first -> 3 rows (>= IBS, not full) -> 2 random rows
    out = f(_synthetic(2, [0.5, 3.0], "s2"))
    assert f.metrics()["eframe/replay_admitted"] == 1 and f.metrics()["eframe/replay_rows"] == 2
    assert len(f.replay) == 3 and f.replay.rows.info["tag"] == ["s1:0", "s1:1", "s2:1"]
    assert len(out) == 4 and out.info["tag"][:2] == ["s2:0", "s2:1"]
    replayed = out.info["tag"][2:]
    assert len(set(replayed)) == 2 and set(replayed) <= {"s1:0", "s1:1", "s2:1"}
    keep, A = out.extras["keep_old_logprobs"], row_advantages(out)
    stored_A = {"s1:0": 1.5, "s1:1": -1.2, "s2:1": 3.0}
    for j, tag in enumerate(replayed):
        assert float(A[2 + j]) == pytest.approx(stored_A[tag])      # stored advantages
        if tag.startswith("s1"):                                    # stored old log-probs, kept through the rescore
            assert keep[2 + j] == 1 and torch.all(out.old_logprobs[2 + j] == -0.7)
        else:                                # admitted this step: scored now, like its fresh copy
            assert keep[2 + j] == 0
    assert f.metrics()["eframe/replay_share"] == 0.5
    # steps 3-6: fill the buffer (only |A| > 1 rows of the *trained fresh* rows enter, never replayed ones)
    f(_synthetic(2, [2.0, 2.0], "s3"))       # admits s3:0, s3:1 -> 5 rows; not due
    assert len(f.replay) == 5 and f.metrics()["eframe/replay_rows"] == 0
    f(_synthetic(2, [2.0, 2.0], "s4"))       # admits s4 -> 7 rows, capacity 6: the oldest dropped; due and full
    assert len(f.replay) == 6 and f.replay.full and f.metrics()["eframe/replay_rows"] == 6
    assert f.replay.rows.info["tag"] == ["s1:1", "s2:1", "s3:0", "s3:1", "s4:0", "s4:1"]
    f(_synthetic(2, [0.1, 0.1], "s5"))       # nothing admitted; not due
    out = f(_synthetic(2, [2.5, 0.1], "s6"))  # admits s6:0 (FIFO drops s1:1); due and full: the whole buffer
    assert f.metrics()["eframe/replay_rows"] == 6
    assert out.info["tag"][2:] == ["s2:1", "s3:0", "s3:1", "s4:0", "s4:1", "s6:0"]
    # rows admitted at earlier steps were replaced by their rescored copies at the next call: stored, kept
    assert f.replay.rows.extras["keep_old_logprobs"].tolist() == [1, 1, 1, 1, 1, 0]


def test_filter_and_strategy_state_roundtrip():
    f = EFRameFilter(EFRameFilter.Params(train_batch_size=2, replay_freq=1), PluginContext(seed=3))
    f(_synthetic(3, [1.5, 1.5, 1.5], "a"))
    f(_synthetic(1, [2.0], "b"))
    state = f.state_dict()
    g = EFRameFilter(EFRameFilter.Params(train_batch_size=2, replay_freq=1), PluginContext(seed=3))
    g.load_state_dict(state)
    outs = [h(_synthetic(3, [1.5, 0.2, -2.0], "c")) for h in (f, g)]
    assert outs[0].info["tag"] == outs[1].info["tag"] and len(f.replay) == len(g.replay) and len(f.pending) == len(g.pending)
    s = EFRameRollout(EFRameRollout.Params(explore_samples=7, explore_temperature=1.3))
    s2 = EFRameRollout()
    s2.load_state_dict(s.state_dict())
    assert (s2.params.explore_samples, s2.params.explore_temperature) == (7, 1.3)


def test_row_fifo():
    q = RowFIFO(3)
    assert q.push(_synthetic(2, [1, 1], "a")) == 0 and q.push(_synthetic(2, [1, 1], "b")) == 1
    assert q.rows.info["tag"] == ["a:1", "b:0", "b:1"] and q.full
    assert q.pop_oldest(2).info["tag"] == ["a:1", "b:0"] and len(q) == 1


# ------------------------------------------------- log-prob temperature
def test_sample_treatment_marks_rows_with_their_temperature():
    eng = ScriptedEngine(worked_example_outcomes())
    b = EFRameRollout(EFRameRollout.Params(explore_logprob_temperature="sample"))(ROWS, make_rctx(eng))
    t = b.extras["logprob_temperature"]
    assert t[:15].tolist() == [1.0] * 15 and t[15:].tolist() == pytest.approx([1.2] * 20)


@pytest.fixture()
def tiny_trainer(tmp_path, echo_rows):
    from rlkit.trainer import Trainer

    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 2}))
    return Trainer(cfg, train_rows=echo_rows)


def _manual_logprobs(tr, b, temps):
    """Reference log-probs: full HF forward, logits / T per row, gather the sampled tokens."""
    out = torch.zeros(b.response_ids.shape)
    for i in range(len(b)):
        L = int(b.response_mask[i].sum())
        ids = torch.tensor(b.prompt_ids[i] + b.response_ids[i, :L].tolist())[None]
        with torch.no_grad():
            logits = tr.unwrapped_lm(ids).logits[0].float()
        lp = torch.log_softmax(logits[len(b.prompt_ids[i]) - 1:-1] / temps[i], -1)
        out[i, :L] = lp.gather(-1, ids[0, len(b.prompt_ids[i]):, None]).squeeze(-1)
    return out


def test_trainer_scores_each_row_at_its_logprob_temperature(tiny_trainer):
    """``sample``: rows with extras["logprob_temperature"] are scored at that temperature (NaN = the trainer's);
    ``train`` (no extra): every row at the trainer's temperature, whatever it was sampled at."""
    tr = tiny_trainer
    ids = tr.tokenizer("abc:")["input_ids"]
    resp = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 0]])
    b = Batch(prompt_ids=[ids] * 3, response_ids=resp, response_mask=mask, group_ids=torch.zeros(3, dtype=torch.long),
              extras={"logprob_temperature": torch.tensor([1.2, float("nan"), 1.2])})
    tr._score(b)
    torch.testing.assert_close(b.old_logprobs, _manual_logprobs(tr, b, [1.2, 1.0, 1.2]) * mask, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b.old_logprobs[0], b.old_logprobs[1])      # same tokens, different temperature
    b.extras.clear()
    tr._score(b)
    torch.testing.assert_close(b.old_logprobs, _manual_logprobs(tr, b, [1.0, 1.0, 1.0]) * mask, atol=1e-5, rtol=1e-5)
    # replayed rows keep their stored old log-probs through a rescore
    stored = b.old_logprobs.clone()
    b.old_logprobs = torch.full_like(stored, -3.0) * mask
    b.extras["keep_old_logprobs"] = torch.tensor([1.0, 0.0, float("nan")])
    tr._score(b)
    assert torch.all(b.old_logprobs[0] == -3.0) and torch.allclose(b.old_logprobs[1:], stored[1:])


def test_trainer_rescores_filter_output(tmp_path, echo_rows, monkeypatch):
    """rescore_after: the trainer runs its scoring pass on the filter's output, every step it returns rows."""
    from rlkit.trainer import Trainer

    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 3, "rollout.samples_per_prompt": 5}) + [
        "rollout.strategy={name: eframe, explore_samples: 4}",
        "algorithm.filters=[{name: eframe_filter, train_batch_size: 6, replay_freq: 1}]"])
    tr = Trainer(cfg, train_rows=echo_rows)
    scored = []
    orig = tr._score
    monkeypatch.setattr(tr, "_score", lambda b: (scored.append(b), orig(b))[1])

    class Spy:  # the eframe filter, recording what it returns
        rescore_after, stage = True, "post_advantage"

        def __init__(self, f):
            self.f, self.returned = f, []

        def __call__(self, b):
            self.returned.append(self.f(b))
            return self.returned[-1]

        def metrics(self):
            return self.f.metrics()

    spy = tr.post_filters[0] = Spy(tr.post_filters[0])
    for _ in range(3):
        m = tr.step()
    outs = [o for o in spy.returned if o is not None]
    assert outs and all(any(o is s for s in scored) for o in outs)
    for o in outs:
        assert o.old_logprobs is not None and (o.old_logprobs.abs() * o.response_mask).sum() > 0
    assert "eframe/pending_rows" in m and "eframe/rollout_entropy" in m


# -------------------------------------------------------------- e2e
def _launch(recipe, tmp_path, *extra):
    return launch_recipe(recipe, tmp_path, *extra)


def mean(xs):
    return sum(xs) / len(xs)


def test_eframe_end_to_end_tiny(tmp_path):
    m, run = _launch("eframe", tmp_path)
    steps = len(m)
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    updates = [r for r in m if r["eframe/update"] > 0]
    assert len(updates) >= steps // 3 and all("loss/policy" in r for r in updates)
    assert any(r["eframe/explore_samples"] > 0 for r in m) and any(r["eframe/explore_kept"] > 0 for r in m)
    assert any(r["eframe/replay_rows"] > 0 for r in m)                      # replay mixed in at least once
    # the profile is sized so the pending FIFO keeps the exploration survivors (issue 10: 289 of 292 were dropped)
    assert sum(r["eframe/pending_dropped_explore"] for r in m) == 0 and sum(r["eframe/explore_kept"] for r in m) > 0
    for r in updates:   # samples_per_minibatch 40: the optimizer steps follow the rows trained, replayed rows included
        assert r["train/optimizer_steps"] == -(-(r["eframe/train_rows"] + r["eframe/replay_rows"]) // 40), r
    for k in ("eframe/filter_rate", "eframe/replay_buffer_rows", "eframe/replay_share", "eframe/hard_frac"):
        assert k in m[-1], k
    r = [x["eframe/main_reward_mean"] for x in m]
    assert mean(r[-4:]) > mean(r[:4]), r
    state = torch.load(run / "checkpoints" / f"step_{steps}" / "rlkit.pt", weights_only=False)["plugins"]
    assert {"pending", "replay", "gen"} <= set(state["filter0"]) and state["filter0"]["replay"]["rows"] is not None
    assert state["strategy"] == {"explore_samples": 20, "explore_temperature": 1.2}


# ------------------------------------------------- mechanism (trainer-level)
def _eframe_trainer(tmp_path, echo_rows, **extra):
    from rlkit.trainer import Trainer

    over = {"trainer.total_steps": 6, "rollout.samples_per_prompt": 5, "trainer.samples_per_minibatch": 4,
            "reward.functions": "[" + str(REPO / "rewards" / "toy.py") + ":echo_hit]", "trainer.lr": 2e-2,
            "trainer.seed": 3, **extra}
    cfg = load_config(tiny_overrides(tmp_path, **over) + [
        "rollout.strategy={name: eframe, explore_samples: 8}",
        "algorithm.filters=[{name: eframe_filter, train_batch_size: 8, pending_capacity: 4.0, replay_size: 1.0, "
        "replay_freq: 2, drop_truncated_positive: false}]"])
    return Trainer(cfg, train_rows=echo_rows)


def test_mechanism_replay_adds_optimizer_steps(tmp_path, echo_rows):
    """EFRame's replay acts in training: every second step the replay buffer's rows (whole buffer once full) are
    trained next to the fresh rows, and with trainer.samples_per_minibatch = 4 each 4 trained rows are one more
    optimizer step.  Fails when replay is off (no replayed rows) and when the trainer's mini-batch count ignores
    the rows trained (a replay step gets as many optimizer steps as a fresh-only step)."""
    tr = _eframe_trainer(tmp_path, echo_rows)
    ms = [tr.step() for _ in range(6)]
    replay_steps = [m for m in ms if m.get("eframe/replay_rows", 0) > 0]
    assert replay_steps, [m.get("eframe/replay_buffer_rows") for m in ms]
    for m in ms:
        if m.get("eframe/update", 0) > 0:
            rows = m["eframe/train_rows"] + m["eframe/replay_rows"]
            assert m["train/samples"] == rows
            assert m["train/optimizer_steps"] == -(-rows // 4), m       # ceil(rows / samples_per_minibatch)
    for m in replay_steps:   # replayed rows add optimizer steps on top of the fresh rows'
        assert m["train/optimizer_steps"] >= -(-m["eframe/train_rows"] // 4) + m["eframe/replay_rows"] // 4
    assert sum(m.get("eframe/pending_dropped", 0) for m in ms) == 0
