"""Built-in reward functions (rewards/) and the reward manager (rlkit.rewarding)."""
from __future__ import annotations

import json
import math
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from rlkit.config import ConfigError, RewardConfig
from rlkit.rewarding import BUILTIN_REWARDS, Rewarder, from_verl, resolve_reward, validate_reward_specs

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def nan_equal(t, expected):
    exp = torch.tensor([math.nan if v is None else v for v in expected], dtype=torch.float32)
    return torch.allclose(t, exp, equal_nan=True)


def call(functions, completions, columns=None, group_ids=None, **cfg):
    r = Rewarder(RewardConfig(functions=functions, **cfg))
    n = len(completions)
    return r([f"p{i}" for i in range(n)], completions, [[1] * (i + 1) for i in range(n)], columns or {},
             group_ids if group_ids is not None else list(range(n)))


# ------------------------------------------------------------ built-ins
def test_gsm8k_strict_vs_flexible():
    from rlkit.builtin_rewards.gsm8k import gsm8k_flexible, gsm8k_strict

    completions = ["so\n#### 1,234", "The answer is $5.", "no answer", "#### 72", "#### 5", "x"]
    answer = ["1234", "5", "3", "#### 72", None, ""]
    assert gsm8k_strict(completions, answer) == [1.0, 0.0, 0.0, 1.0, None, None]
    assert gsm8k_flexible(completions, answer) == [1.0, 1.0, 0.0, 1.0, None, None]


def test_format_rewards():
    from rlkit.builtin_rewards.format import format_boxed, format_gsm8k

    assert format_gsm8k(["#### 3", "the answer is 3", "#### x"]) == [1.0, 0.0, 0.0]
    assert format_boxed(["\\boxed{\\frac{1}{2}}", "\\boxed{}", "\\boxed{3", "none"]) == [1.0, 0.0, 0.0, 0.0]


def test_length_penalty_and_factory():
    from rlkit.builtin_rewards.length import length_penalty, make_length_penalty

    ids = [[0] * 5, [0] * 10, [0] * 15, [0] * 40]
    assert length_penalty(["a"] * 4, ids, target_length=10, max_length=20, scale=2.0) == [0.0, 0.0, -1.0, -2.0]
    fn = make_length_penalty(target_length=1, max_length=3)
    assert fn.__name__ == "length_penalty"
    assert fn(["a", "abc", "abcdef"]) == [0.0, -1.0, -1.0]   # characters without completion_ids
    with pytest.raises(ValueError):
        length_penalty(["a"], target_length=5, max_length=5)


def test_math_verify_reward():
    from rlkit.builtin_rewards.math import math_verify

    completions = ["so $\\boxed{0.5}$", "\\boxed{2}", "\\boxed{3}", "\\boxed{72}", "anything"]
    answer = ["\\frac{1}{2}", "3", "3", "#### 72", None]
    assert math_verify(completions, answer) == [1.0, 0.0, 1.0, 1.0, None]


def test_majority_vote_spec_example_and_tie():
    answers = ["3", "3", "4", "3", "None", "4", "3", "5", "3", "4"]
    group_a = [f"so \\boxed{{{a}}}" if a != "None" else "I do not know" for a in answers]
    group_b = ["\\boxed{2}", "\\boxed{5}", "\\boxed{2}", "\\boxed{5}"]
    res = call(["majority_vote"], group_a + group_b, group_ids=[0] * 10 + [1] * 4)
    assert res.rewards.tolist() == [1, 1, 0, 1, 0, 0, 1, 0, 1, 0] + [1, 0, 1, 0]
    assert res.components["majority_vote"].mean().item() == pytest.approx(7 / 14)


def test_majority_vote_equivalent_forms():
    from rlkit.builtin_rewards.majority_vote import majority_vote

    assert majority_vote.group_reward is True
    out = majority_vote(["\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1}", "none"])
    assert out["score"] == [1.0, 1.0, 1.0, 0.0, 0.0]     # 0.5 did not vote but equals the label
    assert majority_vote(["a", "b", "\\boxed{4}"], exclude_none_from_vote=True)["score"] == [0.0, 0.0, 1.0]
    # the original MM-UPT votes the string "None", which can win
    assert majority_vote(["a", "b", "\\boxed{4}"], exclude_none_from_vote=False)["score"] == [1.0, 1.0, 0.0]


# ----------------------------------------------------------- the manager
def test_trl_convention_columns_and_kwargs():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                    level=level, kwargs=kwargs)
        return [float(x) for x in level]

    r = Rewarder(RewardConfig(functions=[spy], timeout_s=5))
    res = r(["q0", "q1"], ["c0", "c1"], [[1], [2, 3]], {"answer": ["7", "8"], "level": [1, 2], "prompt": ["raw0", "raw1"]},
            [0, 0], trainer_state="STATE")
    assert seen["prompts"] == ["q0", "q1"] and seen["completions"] == ["c0", "c1"]
    assert seen["completion_ids"] == [[1], [2, 3]] and seen["answer"] == ["7", "8"] and seen["level"] == [1, 2]
    assert seen["kwargs"] == {"trainer_state": "STATE"}   # the raw "prompt" column is not forwarded twice
    assert res.rewards.dtype == torch.float32 and res.rewards.tolist() == [1.0, 2.0]
    assert list(res.components) == ["spy"]


def test_none_is_nan_and_left_out_of_weighted_sum():
    def a(completions, **kw):
        return [1.0, None, None, 0.5]

    def b(completions, **kw):
        return [2.0, 3.0, None, None]

    res = call([a, b], ["w", "x", "y", "z"], weights=[1.0, 0.5])
    assert nan_equal(res.components["a"], [1.0, None, None, 0.5])
    assert nan_equal(res.rewards, [2.0, 1.5, None, 0.5])   # all-None sample -> NaN
    assert res.components["a"].nanmean().item() == pytest.approx(0.75)  # the trainer logs this as reward/a/mean
    assert res.metrics["reward/a/skipped_frac"] == 0.5 and res.metrics["reward/b/skipped_frac"] == 0.5
    assert res.metrics["reward/a/errors"] == 0


def test_zero_weight_function_is_logged_only():
    def acc(completions, **kw):
        return [None, 1.0]

    def fmt(completions, **kw):
        return [1.0, 1.0]

    res = call([acc, {"name": fmt, "weight": 0.0}], ["a", "b"])
    assert nan_equal(res.rewards, [None, 1.0])
    assert res.components["fmt"].tolist() == [1.0, 1.0]


def test_dict_sub_scores():
    def per_sample(completions, **kw):
        return [{"score": 1.0, "acc": True, "pred": "72"}, {"score": 0.0, "acc": False, "pred": "x"}]

    def dict_of_lists(completions, **kw):
        return {"score": [0.5, None], "len": [3, 4]}

    res = call([per_sample, dict_of_lists], ["a", "b"])
    assert res.components["per_sample"].tolist() == [1.0, 0.0]
    assert res.components["per_sample/acc"].tolist() == [1.0, 0.0]
    assert "per_sample/pred" not in res.components                  # text extras are not logged
    assert nan_equal(res.components["dict_of_lists"], [0.5, None])
    assert res.components["dict_of_lists/len"].tolist() == [3.0, 4.0]
    assert res.rewards.tolist() == [1.5, 0.0]
    assert res.components["per_sample/acc"].nanmean().item() == 0.5  # logged by the trainer as reward/per_sample/acc/mean


def test_user_file_spec(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        def contains_answer(completions, answer, bonus=1.0, **kwargs):
            return [bonus if a in c else 0.0 for c, a in zip(completions, answer)]
    '''))
    monkeypatch.chdir(tmp_path)
    cfg = RewardConfig(functions=["my_rewards.py:contains_answer", {"path": "my_rewards.py:contains_answer", "bonus": 3.0}])
    validate_reward_specs(cfg)
    r = Rewarder(cfg)
    assert r.names == ["contains_answer", "contains_answer_2"]
    res = r(["p", "p"], ["it is 7", "it is 8"], None, {"answer": ["7", "9"]}, [0, 1])
    assert res.components["contains_answer"].tolist() == [1.0, 0.0]
    assert res.components["contains_answer_2"].tolist() == [3.0, 0.0]
    assert res.rewards.tolist() == [4.0, 0.0]
    # a parameter bound in the recipe wins over a dataset column of the same name
    r2 = Rewarder(RewardConfig(functions=[{"path": "my_rewards.py:contains_answer", "bonus": 2.0}]))
    res2 = r2(["p"], ["it is 7"], None, {"answer": ["7"], "bonus": ["column"]}, [0])
    assert res2.rewards.tolist() == [2.0]


def test_import_path_and_builtin_specs():
    rf = resolve_reward("rlkit.builtin_rewards.gsm8k:gsm8k_strict")
    assert rf.name == "gsm8k_strict" and rf.weight == 1.0 and not rf.is_group
    assert resolve_reward("rlkit.builtin_rewards.gsm8k.gsm8k_flexible").name == "gsm8k_flexible"
    assert resolve_reward({"name": "majority_vote", "weight": 2}).is_group
    assert resolve_reward("majority_vote").is_group
    lp = resolve_reward({"name": "length_penalty", "target_length": 1, "max_length": 2})
    assert lp.fn(completions=["abc"], completion_ids=None) == [-1.0]
    for name, target in BUILTIN_REWARDS.items():
        assert callable(resolve_reward(name).fn), target


def test_builtins_registered_lazily(monkeypatch):
    from rlkit.registry import REWARDS

    assert set(BUILTIN_REWARDS) <= set(REWARDS._items)
    assert "math" in repr(REWARDS._items["math_verify"])
    # validating imports the built-in reward modules (a few ms: stdlib and rlkit.answers; their signatures check
    # bound params) but never math-verify or sympy (loaded in the math-verify worker processes only)
    for mod in [m for m in sys.modules if m.startswith("rlkit.builtin_rewards.")]:
        monkeypatch.delitem(sys.modules, mod)
    before = set(sys.modules)
    validate_reward_specs(RewardConfig(functions=["math_verify", "majority_vote", "gsm8k_strict",
                                                  {"name": "length_penalty", "max_length": 9, "target_length": 3}]))
    new = set(sys.modules) - before
    assert not [m for m in new if m.startswith(("math_verify", "sympy"))], new


def test_exception_counted_and_run_continues(caplog):
    calls = []

    def broken(completions, **kw):
        calls.append(1)
        raise ZeroDivisionError("boom")

    def ok(completions, **kw):
        return [1.0] * len(completions)

    r = Rewarder(RewardConfig(functions=[broken, ok]))
    with caplog.at_level("WARNING", logger="rlkit.rewarding"):
        res = r(["p"] * 2, ["a", "b"], None, {}, [0, 0])
        res2 = r(["p"] * 2, ["a", "b"], None, {}, [0, 0])
    assert res.rewards.tolist() == [1.0, 1.0] and res2.rewards.tolist() == [1.0, 1.0]
    assert torch.isnan(res.components["broken"]).all()
    assert res.metrics["reward/broken/errors"] == 1 and res.metrics["reward/broken/skipped_frac"] == 1.0
    assert r.totals["broken"]["errors"] == 2 and len(calls) == 2
    warnings = [rec for rec in caplog.records if "broken" in rec.getMessage() and "cannot be imported" not in rec.getMessage()]
    assert len(warnings) == 1 and "ZeroDivisionError" in warnings[0].getMessage()   # traceback logged once


def test_wrong_length_counts_as_error():
    def short(completions, **kw):
        return [1.0]

    res = call([short], ["a", "b"])
    assert res.metrics["reward/short/errors"] == 1 and torch.isnan(res.rewards).all()


def test_strict_mode_raises():
    def broken(completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="broken"):
        call([broken], ["a"], strict=True)


def test_timeout_counts_and_does_not_hang():
    release = threading.Event()

    def hangs(completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    def ok(completions, **kw):
        return [0.5] * len(completions)

    t0 = time.monotonic()
    try:
        res = call([hangs, ok], ["a", "b"], timeout_s=0.3)
        with pytest.raises(RuntimeError, match="hangs"):
            call([hangs], ["a"], timeout_s=0.3, strict=True)
    finally:
        release.set()
    assert time.monotonic() - t0 < 5
    assert res.metrics["reward/hangs/timeouts"] == 1 and res.metrics["reward/hangs/errors"] == 0
    assert res.rewards.tolist() == [0.5, 0.5]


def test_function_with_own_timeout_is_not_cut_off():
    def slow_but_bounded(completions, **kw):
        time.sleep(0.5)
        return [1.0] * len(completions)

    slow_but_bounded.handles_timeout = True
    res = call([slow_but_bounded], ["a"], timeout_s=0.1)
    assert res.rewards.tolist() == [1.0] and res.metrics["reward/slow_but_bounded/timeouts"] == 0


def test_async_reward():
    async def a(completions, **kw):
        return [2.0 for _ in completions]

    assert call([a], ["x"]).rewards.tolist() == [2.0]


def test_group_reward_sees_exactly_its_group():
    calls = []

    def grp(prompts, completions, completion_ids, tag, **kw):
        calls.append((list(prompts), list(completions), list(tag), [len(c) for c in completion_ids]))
        return [float(len(completions))] * len(completions)

    grp.group_reward = True
    r = Rewarder(RewardConfig(functions=[grp]))
    res = r(["P1", "P0", "P1", "P0", "P1"], ["a", "b", "c", "d", "e"], [[1], [1, 2], [1, 2, 3], [1] * 4, [1] * 5],
            {"tag": ["t0", "t1", "t2", "t3", "t4"]}, [1, 0, 1, 0, 1])
    assert calls == [(["P1", "P1", "P1"], ["a", "c", "e"], ["t0", "t2", "t4"], [1, 3, 5]),
                     (["P0", "P0"], ["b", "d"], ["t1", "t3"], [2, 4])]
    assert res.rewards.tolist() == [3.0, 2.0, 3.0, 2.0, 3.0]


def test_from_verl_adapter():
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        assert data_source == "openai/gsm8k" and extra_info["split"] == "test"
        ok = solution_str.strip().endswith(ground_truth)
        return {"score": float(ok), "acc": ok}

    rows = {"data_source": ["openai/gsm8k"] * 2, "extra_info": [{"split": "test"}] * 2,
            "reward_model": [{"style": "rule", "ground_truth": "72"}, {"style": "rule", "ground_truth": "5"}]}
    r = Rewarder(RewardConfig(functions=[from_verl(compute_score)]))
    res = r(["p", "p"], ["#### 72", "#### 6"], None, rows, [0, 1])
    assert res.components["compute_score"].tolist() == [1.0, 0.0]
    assert res.components["compute_score/acc"].tolist() == [1.0, 0.0]


def test_verl_convention_in_recipe(tmp_path, monkeypatch):
    (tmp_path / "verl_score.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return 1.0 if ground_truth in solution_str else 0.0\n")
    monkeypatch.chdir(tmp_path)
    cfg = RewardConfig(functions=[{"path": "verl_score.py:compute_score", "convention": "verl"}])
    validate_reward_specs(cfg)
    res = Rewarder(cfg)(["p"], ["is 4"], None, {"answer": ["4"]}, [0])
    assert res.rewards.tolist() == [1.0]


# ------------------------------------------------------------ validation
def test_validate_names_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        validate_reward_specs(RewardConfig(functions=["gsm8k_flexible", "gsm8k_strcit"]))
    assert "reward.functions[1]" in str(e.value) and "gsm8k_strict" in str(e.value)


@pytest.mark.parametrize("spec, match", [
    ("missing_file.py:fn", "reward.functions\\[0\\]: reward file not found"),
    ("rewards_here.py:reward_fm", "has no function 'reward_fm'.*Did you mean: reward_fn"),
    ("rewards_here.py", "name the function too"),
    ("no_such_module_xyz:fn", "cannot find module"),
    ("rlkit.answers:no_such_fn", "has no function"),
    ({"name": "length_penalty", "max_lenght": 5}, "no parameter 'max_lenght'.*max_length"),
    ({"name": "gsm8k_strict", "weight": "high"}, "weight: expected a number"),
    ({"weight": 1.0}, "expected a reward name"),
    ({"name": "gsm8k_strict", "convention": "openrlhf"}, "convention"),
])
def test_validate_errors(tmp_path, monkeypatch, spec, match):
    (tmp_path / "rewards_here.py").write_text("def reward_fn(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match):
        validate_reward_specs(RewardConfig(functions=[spec]))


def test_validate_accepts_good_specs(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("import math\nfrom os.path import join\ndef f(completions, **kw):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    validate_reward_specs(RewardConfig(functions=[
        "gsm8k_strict", "r.py:f", "r.py:join", "rlkit.builtin_rewards.math:math_verify",
        {"name": "length_penalty", "max_length": 100, "target_length": 50, "weight": 0.1},
        {"name": "r.py:f", "anything": 1},
    ], weights=None))
    with pytest.raises(ConfigError, match="disagrees"):
        validate_reward_specs(RewardConfig(functions=[{"name": "gsm8k_strict", "weight": 2}], weights=[1.0]))


# ---------------------------------------------------------- shared data
def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_test_golds_score_against_themselves():
    path = SHARED / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    from rlkit.answers import extract_gsm8k_gold
    from rlkit.builtin_rewards.gsm8k import gsm8k_flexible, gsm8k_strict

    rows = _jsonl(path)
    assert len(rows) == 1319
    golds = [extract_gsm8k_gold(r["answer"]) for r in rows]
    completions = [f"Let me think.\n#### {g}" for g in golds]
    assert gsm8k_strict(completions, golds) == [1.0] * len(rows)
    assert gsm8k_strict(completions, [r["answer"] for r in rows]) == [1.0] * len(rows)   # raw "#### N" column
    assert gsm8k_flexible(completions, golds) == [1.0] * len(rows)


def test_math500_golds_verify_against_themselves_boxed():
    path = SHARED / "data" / "math500" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    from rlkit.builtin_rewards.math import math_verify

    rows = _jsonl(path)[::10][:50]
    answers = [r["answer"] for r in rows]
    scores = math_verify([f"The final answer is $\\boxed{{{a}}}$" for a in answers], answers, timeout_s=20)
    bad = [a for a, s in zip(answers, scores) if s != 1.0]
    assert not bad, bad
