"""Linear length penalty.

0 up to ``target_length``, then falling linearly to ``-scale`` at ``max_length``
(and staying there).  Lengths are in tokens (``completion_ids``) when available,
else in characters.  Set the parameters in the recipe::

    reward:
      functions: [gsm8k_strict, {name: length_penalty, target_length: 256, max_length: 512, scale: 0.5}]

or in Python with ``make_length_penalty(target_length=256, max_length=512)``.
"""
import functools


def length_penalty(completions, completion_ids=None, target_length=512, max_length=1024, scale=1.0, **kwargs):
    """0.0 up to ``target_length`` tokens, then linearly down to ``-scale`` at ``max_length``."""
    if max_length <= target_length:
        raise ValueError(f"length_penalty: max_length ({max_length}) must be > target_length ({target_length})")
    scores = []
    for i, completion in enumerate(completions):
        n = len(completion_ids[i]) if completion_ids is not None else len(completion)
        over = min(max(n - target_length, 0), max_length - target_length)
        scores.append(-scale * over / (max_length - target_length))
    return scores


def make_length_penalty(target_length=512, max_length=1024, scale=1.0):
    """A ``length_penalty`` with its parameters bound (a reward function of its own)."""
    fn = functools.partial(length_penalty, target_length=target_length, max_length=max_length, scale=scale)
    fn.__name__ = "length_penalty"
    return fn
