"""Answer extraction (rlkit.answers) and math-verify in worker processes (rlkit.mathverify)."""
from __future__ import annotations

import time

import pytest

from rlkit import mathverify
from rlkit.answers import (
    completion_text,
    extract_gsm8k_flexible,
    extract_gsm8k_gold,
    extract_gsm8k_strict,
    extract_last_boxed,
    normalize_number,
    numbers_equal,
)


# ------------------------------------------------------------------ GSM8K
@pytest.mark.parametrize("text, expected", [
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("a #### 5 then #### 7", "7"),
    ("#### $5", "5"),
    ("#### -3", "-3"),
    ("#### 72.", "72"),
    ("  #### 0.5  ", "0.5"),
    ("#### 1 000", "1000"),
    ("72", "72"),
])
def test_gsm8k_gold(text, expected):
    assert extract_gsm8k_gold(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so the total is 12.\n#### 1,234", "1234"),
    ("#### $5", "5"),
    ("#### 5.", "5"),
    ("#### -7", "-7"),
    ("#### 12 and later #### 13", "13"),
    ("The answer is $5.", None),
    ("no answer", None),
    ("####", None),
    ("#### five", None),
    ("#### 3" + " filler" * 100, None),          # the #### is outside the last 300 characters
    ("x" * 1000 + "\n#### 42", "42"),
])
def test_gsm8k_strict(text, expected):
    assert extract_gsm8k_strict(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is $5.", "5"),
    ("#### 1,234", "1234"),
    ("costs 1,234,567 dollars", "1234567"),
    ("3 apples and 4.5 pears", "4.5"),
    ("it is -12 degrees", "-12"),
    ("3-5 = -2", "-2"),
    ("from 3-5", "5"),
    ("take .5 of it", ".5"),
    ("no digits", None),
    ("", None),
    ("1,2345", "2345"),
])
def test_gsm8k_flexible(text, expected):
    assert extract_gsm8k_flexible(text) == expected


def test_conversational_completion():
    conv = [{"role": "assistant", "content": "so #### 9"}]
    assert completion_text(conv) == "so #### 9"
    assert extract_gsm8k_strict(conv) == "9"


@pytest.mark.parametrize("s, expected", [
    ("1,000", "1000"), ("3.0", "3"), ("-0", "0"), ("$5", "5"), ("3.50", "3.5"), (".5", "0.5"),
    ("100", "100"), ("1e3", "1000"), ("72.", "72"), (" 12 ", "12"), ("abc", "abc"), (7, "7"),
])
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


def test_numbers_equal():
    assert numbers_equal("1,000", "1000")
    assert numbers_equal("0.50", ".5")
    assert numbers_equal("3.0", 3)
    assert numbers_equal("-0", "0")
    assert not numbers_equal("3", "4")
    assert not numbers_equal(None, "4")
    assert numbers_equal("abc", "abc") and not numbers_equal("abc", "abd")


# ------------------------------------------------------------------ boxed
@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a_{b_{c}}} done", "a_{b_{c}}"),
    ("the answer is \\boxed 5$.", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{}", ""),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1", None),
    ("no box", None),
    ("\\boxedx", None),
])
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# ------------------------------------------------------------- math-verify
def test_math_equal_equivalences():
    assert mathverify.math_equal("\\frac{1}{2}", "0.5") is True
    assert mathverify.math_equal("2", "\\boxed{3}") is False
    res = mathverify.math_equal_many([
        ("\\frac{1}{2}", "so the answer is $\\boxed{0.5}$"),
        ("3", "\\boxed{3}"),
        ("x^2", "\\boxed{x \\cdot x}"),
        ("\\sqrt{2}", "\\boxed{\\frac{2}{\\sqrt{2}}}"),
        ("10", "no answer at all"),
    ])
    assert res == [True, True, True, True, False]
    assert mathverify.math_equal_many([]) == []
    # bare answers (box contents) are wrapped first: bare "3\\pi" would parse as 3
    assert mathverify.math_equal_many([("3\\pi", "3\\pi"), ("3", "3\\pi"), ("(1,2)", "(1, 2)")], boxed_pred=True) \
        == [True, False, True]


def _slow_check(gold, pred, inner_timeout):
    """Runs in a worker (imported there as tests.test_answers): hangs on "slow"."""
    if pred == "slow":
        time.sleep(120)
    return gold == pred


def test_math_equal_timeout_kills_stuck_worker():
    mathverify._get_pool()  # start-up is not part of the check's timeout
    restarts = mathverify.stats["pool_restarts"]
    t0 = time.monotonic()
    res = mathverify.math_equal_many([("a", "a"), ("a", "slow"), ("b", "b"), ("a", "c")], timeout_s=2.0,
                                     checker=_slow_check)
    elapsed = time.monotonic() - t0
    assert res == [True, None, True, False]       # the others still get answers
    assert elapsed < 15, elapsed                   # no hang on the sleeping worker
    assert mathverify.stats["pool_restarts"] == restarts + 1
    assert mathverify.math_equal("1", "\\boxed{1}") is True   # a fresh pool works
