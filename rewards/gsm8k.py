"""GSM8K accuracy rewards (as verl's ``gsm8k.py``).

* ``gsm8k_strict``: 1.0 when the last ``#### <number>`` (in the last 300 characters)
  equals the gold answer, else 0.0.
* ``gsm8k_flexible``: 1.0 when the last number anywhere in the completion equals it.

The ``answer`` column holds the gold number ("72"); a raw GSM8K answer with
``#### 72`` works too.  A sample without a gold answer gets ``None`` (skipped).
"""
from rlkit.answers import extract_gsm8k_flexible, extract_gsm8k_gold, extract_gsm8k_strict, numbers_equal


def _gold(answer):
    if answer is None:
        return None
    gold = extract_gsm8k_gold(answer)
    return gold or None


def _score(completions, answer, extract):
    scores = []
    for completion, ans in zip(completions, answer):
        gold = _gold(ans)
        if gold is None:
            scores.append(None)
            continue
        pred = extract(completion)
        scores.append(1.0 if pred is not None and numbers_equal(pred, gold) else 0.0)
    return scores


def gsm8k_strict(completions, answer, **kwargs):
    """1.0 if the last ``#### N`` equals the gold answer, else 0.0 (None without a gold answer)."""
    return _score(completions, answer, extract_gsm8k_strict)


def gsm8k_flexible(completions, answer, **kwargs):
    """1.0 if the last number in the completion equals the gold answer, else 0.0."""
    return _score(completions, answer, extract_gsm8k_flexible)
