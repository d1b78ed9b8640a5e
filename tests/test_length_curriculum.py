"""Length-budget curriculum ("Train Long, Think Short"): the triangular reward, the schedules, the controller."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rlkit.algorithms.length_curriculum import (LengthBudgetController, bind_reward_kwargs, exponential_budget,
                                                stepwise_budget)
from rlkit.builtin_rewards.length_budget import length_budget, triangular_length_reward
from rlkit.config import ConfigError, DataConfig, load_config
from rlkit.plugins import PluginContext
from rlkit.rewarding import Rewarder, validate_reward_specs
from tests.conftest import REPO, launch_recipe


def ids(*lengths):
    return [[7] * n for n in lengths]


def test_spec_example_triangular_reward():
    # L = 87, R_max = 1: l = 50 -> 0.5747; 87 -> 1; 130 -> 0.5057; >= 174 -> 0
    out = length_budget([""] * 6, completion_ids=ids(50, 87, 130, 174, 175, 400), budget=87)
    assert out == pytest.approx([0.5747, 1.0, 0.5057, 0.0, 0.0, 0.0], abs=1e-4)
    assert triangular_length_reward(0, 87) == 0.0
    assert triangular_length_reward(87, 87, r_max=2.0) == 2.0
    assert length_budget(["abcd"], budget=8) == [0.5]                       # characters without completion_ids
    assert length_budget([""] * 2, completion_ids=ids(5, 5), budget=[10, None]) == [0.5, None]   # per-row column
    with pytest.raises(ValueError, match="no budget"):
        length_budget([""], completion_ids=ids(3))


def test_schedule_256_179_125_87():
    assert [exponential_budget(t) for t in (0, 149, 150, 299, 300, 449, 450, 599)] == [256, 256, 179, 179, 125, 125, 87, 87]
    assert exponential_budget(10_000, 256, 0.5, 1) == 1                     # never below 1
    # step-wise variants over 600 steps, 3 drops (one every 150 steps) to 87
    assert [stepwise_budget(t, 600, 256, 87, 3, "linear") for t in (0, 150, 300, 450, 599)] == [256, 199, 143, 87, 87]
    assert [stepwise_budget(t, 600, 256, 87, 3, "geometric") for t in (0, 150, 300, 450)] == [256, 178, 124, 87]
    c = LengthBudgetController(LengthBudgetController.Params(schedule="linear", final_budget=87), PluginContext(total_steps=600))
    assert c.budget_at(450) == 87


def test_params_and_config_checks():
    with pytest.raises(ValueError, match="final_budget"):
        LengthBudgetController.Params(schedule="geometric")
    with pytest.raises(ValueError, match="schedule"):
        LengthBudgetController.Params(schedule="cosine")
    with pytest.raises(ValueError, match="prompt_template"):
        LengthBudgetController.Params(prompt_template="{prompt} {nope}")
    base = ["model.name_or_path=toy:tiny", "algorithm.controllers=[length_budget]"]
    with pytest.raises(ConfigError, match="no reward.functions entry named 'length_budget'"):
        load_config(base + ["reward.functions=[gsm8k_strict]"])
    load_config(base + ["reward.functions=[gsm8k_strict, {name: length_budget, weight: 0.3}]"])
    load_config(base + ["reward.functions=[gsm8k_strict]", "algorithm.controllers=[{name: length_budget, prompt_template: '{prompt} {budget}'}]"])


def test_builtin_reward_name_and_params():
    validate_reward_specs(SimpleNamespace(functions=[{"name": "length_budget", "r_max": 2.0, "budget": 87}]))
    with pytest.raises(ConfigError, match="no parameter 'bugdet'"):
        validate_reward_specs(SimpleNamespace(functions=[{"name": "length_budget", "bugdet": 87}]))
    r = Rewarder({"functions": [{"name": "length_budget", "budget": 87}]})
    res = r(prompts=["p"] * 2, completions=["", ""], completion_ids=ids(87, 130))
    assert res.rewards.tolist() == pytest.approx([1.0, 0.5057], abs=1e-4)


def test_bind_reward_kwargs_sets_the_budget_and_keeps_recipe_params():
    r = Rewarder({"functions": [{"name": "length_budget", "weight": 0.5, "r_max": 2.0}, f"{REPO}/rewards/toy.py:echo"]})
    wrapped = SimpleNamespace(rewarder=r)                      # the trainer's timing wrapper
    assert bind_reward_kwargs(wrapped, "length_budget", budget=10) == 1
    res = r(prompts=["p"], completions=["aaaaa"], completion_ids=ids(5), columns={"answer": ["a"]})
    assert res.components["length_budget"].tolist() == [1.0]            # 2.0 * 5 / 10
    bind_reward_kwargs(r, "length_budget", budget=5)
    res = r(prompts=["p"], completions=["aaaaa"], completion_ids=ids(5), columns={"answer": ["a"]})
    assert res.components["length_budget"].tolist() == [2.0]
    assert bind_reward_kwargs(r, "nope", budget=1) == 0


def test_controller_binds_the_budget_and_rewrites_prompts(toy_model_dir):
    from rlkit.data import tokenize_rows
    from rlkit.modeling import load_tokenizer

    tok = load_tokenizer(toy_model_dir)
    cfg = DataConfig(max_prompt_tokens=32)
    rows = tokenize_rows([{"prompt": "abc:"}, {"prompt": "de:"}], cfg, tok)
    rewarder = Rewarder({"functions": [{"name": "length_budget"}]})
    trainer = SimpleNamespace(step_idx=0, rewarder=rewarder, train_rows=rows, eval_rows=None,
                              cfg=SimpleNamespace(data=cfg), tokenizer=tok)
    c = LengthBudgetController(LengthBudgetController.Params(initial_budget=8, decay=0.5, period=2,
                                                             prompt_template="{prompt} use {budget}."), PluginContext())
    score = lambda n: rewarder(prompts=["p"], completions=[""], completion_ids=ids(n)).rewards.item()  # noqa: E731
    c.before_step(trainer)
    assert c.budget == 8 and score(4) == 0.5
    assert rows[0]["prompt"] == "abc: use 8." and tok.decode(rows[0]["prompt_ids"], skip_special_tokens=True) == "abc: use 8."
    trainer.step_idx = 2                                                  # third step: 8 * 0.5
    c.before_step(trainer)
    assert c.budget == 4 and score(4) == 1.0 and rows[1]["prompt"] == "de: use 4."
    m = c.after_step(trainer, {"response_length/mean": 6.0})
    assert m == {"length_budget/budget": 4.0, "length_budget/length_over_budget": 1.5}
    # a resumed run (fresh controller and rows, step_idx from the checkpoint) gets the same budget: no hidden state
    fresh = LengthBudgetController(c.params, PluginContext())
    trainer.train_rows = rows = tokenize_rows([{"prompt": "abc:"}, {"prompt": "de:"}], cfg, tok)
    trainer.step_idx = 3
    fresh.before_step(trainer)
    assert fresh.budget == 4 and rows[1]["prompt"] == "de: use 4."


def test_tiny_recipe_end_to_end_and_report(tmp_path):
    """As users launch it, then `python -m rlkit report` on the run."""
    m, run = launch_recipe("length_curriculum_gsm8k", tmp_path)
    assert [r["length_budget/budget"] for r in m] == [8, 8, 8, 5, 5, 5, 3, 3, 3, 2, 2, 2]   # int(8 * 0.7 ** (t // 3))
    assert all("reward/length_budget/mean" in r and "length_budget/length_over_budget" in r for r in m)
    for r in m:      # the metric reacts to the budget: mean length over the running step's budget
        assert r["length_budget/length_over_budget"] == pytest.approx(r["response_length/mean"] / r["length_budget/budget"])
    comps = [json.loads(line) for line in open(run / "completions.jsonl")]
    assert {c["prompt"].rsplit(" use ", 1)[1] for c in comps if c["step"] == 12} == {"2."}   # budget in the prompt
    budget = {r["step"]: r["length_budget/budget"] for r in m}
    for c in comps:   # every step's reward uses that step's budget (not only the logged metric)
        assert c["reward/length_budget"] == pytest.approx(triangular_length_reward(c["length"], budget[c["step"]])), c
    short = [c for c in comps if c["step"] == 12 and c["length"] <= 2]
    assert all(c["reward/length_budget"] == pytest.approx(c["length"] / 2) for c in short)
    p = subprocess.run([sys.executable, "-m", "rlkit", "report", str(run)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    page = (run / "report" / "index.html").read_text()
    assert (run / "report" / "curriculum_length_budget.png").exists() and "curriculum: length budget" in page
    assert "use 2." in page and "id='config'" in page and "length_budget" in page


def test_prompt_template_on_a_conversational_prompt():
    """A chat prompt (TRL's message list) gets the budget in its last user message; text prompts as before."""
    c = LengthBudgetController(LengthBudgetController.Params(prompt_template="{prompt} ({budget} tokens)"),
                               PluginContext(total_steps=10))
    c.budget = 64
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    out = c._with_budget(msgs)
    assert out[3] == {"role": "user", "content": "and 3+3? (64 tokens)"} and out[:3] == msgs[:3]
    assert msgs[3]["content"] == "and 3+3?"          # the original is not modified
    assert c._with_budget("2+2?") == "2+2? (64 tokens)"
