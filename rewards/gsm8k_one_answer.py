"""A GSM8K format reward that answer spam cannot satisfy, and the accuracy reward that goes with it.

``format_gsm8k`` (rewards/format.py) only asks for a strict ``#### N`` somewhere in the tail, and a small model
trained on it learns to print ``#### 20\\n#### 2\\n#### 20 ...`` (docs/reproduce.md, the first SmolLM2 run).  These
two functions ask for one well-formed answer instead.  A completion is **well-formed** when all of these hold:

1. ``####`` occurs exactly once in it (``########`` counts twice);
2. its last non-empty line is that answer and nothing else: ``#### 72`` (also ``#### $72``, ``#### 1,000``,
   ``#### -3.5``, a trailing ``.``); nothing may follow it;
3. the text before that line has at least ``min_reasoning_chars`` non-blank characters (default 20): some
   working, not a bare number;
4. it was not cut off by the token budget: with ``max_new_tokens`` set (give it the recipe's
   ``rollout.max_new_tokens``), a completion of that many tokens or more counts as truncated.  A completion that
   stopped on its end-of-sequence token at exactly the budget is counted as truncated too (the engine's finish
   reason is not passed to rewards); without ``max_new_tokens`` this check is off.

* ``gsm8k_one_answer``: 1.0 when well-formed, else 0.0 (the format reward).
* ``gsm8k_one_answer_correct``: 1.0 when well-formed **and** the answer equals the gold number, else 0.0; None for a
  row without a gold answer (skipped, as ``gsm8k_strict``).

Use them together, with the correct answer worth more than the format::

    reward:
      functions:
        - {name: rewards/gsm8k_one_answer.py:gsm8k_one_answer, weight: 0.5, max_new_tokens: 96}
        - {name: rewards/gsm8k_one_answer.py:gsm8k_one_answer_correct, weight: 1.0, max_new_tokens: 96}
        - {name: gsm8k_strict, weight: 0.0}     # plain accuracy, logged
      accuracy_key: gsm8k_strict

Copy this file next to your recipe to change the rules (e.g. require ``\\boxed{}`` instead).
"""
import re

from rlkit.answers import completion_text, extract_gsm8k_gold, numbers_equal

# the whole last line: "#### 72", "#### $1,000", "#### -3.5."
_ANSWER_LINE_RE = re.compile(r"####[ \t]*\$?[ \t]*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)[ \t]*\.?")


def one_answer(completion, n_tokens=None, max_new_tokens=None, min_reasoning_chars=20):
    """The answer of a well-formed completion (rules in the module docstring) as text, else None."""
    text = completion_text(completion).rstrip()
    if text.count("####") != 1:
        return None
    if max_new_tokens is not None and n_tokens is not None and n_tokens >= int(max_new_tokens):
        return None
    head, _, last = text.rpartition("\n")
    m = _ANSWER_LINE_RE.fullmatch(last.strip())
    if m is None:
        return None
    if len("".join(head.split())) < int(min_reasoning_chars):
        return None
    return m.group(1).replace(",", "")


def _answers(completions, completion_ids, max_new_tokens, min_reasoning_chars):
    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    return [one_answer(c, None if t is None else len(t), max_new_tokens, min_reasoning_chars)
            for c, t in zip(completions, ids)]


def gsm8k_one_answer(completions, completion_ids=None, max_new_tokens=None, min_reasoning_chars=20, **kwargs):
    """1.0 if the completion is well-formed (exactly one final ``#### N`` line after some working, not truncated)."""
    return [0.0 if a is None else 1.0 for a in _answers(completions, completion_ids, max_new_tokens, min_reasoning_chars)]


def gsm8k_one_answer_correct(completions, answer, completion_ids=None, max_new_tokens=None, min_reasoning_chars=20,
                             **kwargs):
    """1.0 if well-formed and its ``#### N`` equals the gold answer; None without a gold answer."""
    out = []
    for a, gold in zip(_answers(completions, completion_ids, max_new_tokens, min_reasoning_chars), answer):
        gold = None if gold is None else (extract_gsm8k_gold(gold) or None)
        out.append(None if gold is None else (1.0 if a is not None and numbers_equal(a, gold) else 0.0))
    return out
