"""Format rewards: is there a parseable final answer at all?

* ``format_gsm8k``: 1.0 if the completion ends with a strict ``#### <number>`` answer.
* ``format_boxed``: 1.0 if the completion contains a complete, non-empty ``\\boxed{...}``.

Useful with a small weight to teach the answer format, or with weight 0 to log the
format rate next to accuracy.
"""
from rlkit.answers import extract_gsm8k_strict, extract_last_boxed


def format_gsm8k(completions, **kwargs):
    """1.0 if a strict ``#### N`` answer is present (in the last 300 characters), else 0.0."""
    return [1.0 if extract_gsm8k_strict(c) is not None else 0.0 for c in completions]


def format_boxed(completions, **kwargs):
    """1.0 if a complete, non-empty ``\\boxed{...}`` is present, else 0.0."""
    return [1.0 if (extract_last_boxed(c) or "").strip() else 0.0 for c in completions]
