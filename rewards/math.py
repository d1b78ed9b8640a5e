"""MATH accuracy reward with math-verify (symbolic equivalence, e.g. ``\\frac{1}{2}`` == ``0.5``).

The gold answer (``answer`` column, e.g. "\\frac{1}{2}") is wrapped in ``\\boxed{}``
and compared with the completion, which is parsed with LaTeX + expression
extraction (so the final ``\\boxed{...}`` is found).  The checks run in worker
processes with a per-check timeout (see ``rlkit.mathverify``).

Returns 1.0 / 0.0, or ``None`` (skipped) when the gold answer is missing or
cannot be parsed, or the check timed out.  Each check has its own timeout
(``timeout_s``), so the reward manager's per-call timeout is not applied
(``handles_timeout``).
"""
from rlkit.answers import completion_text, extract_gsm8k_gold
from rlkit.mathverify import math_equal_many


def math_verify(completions, answer, timeout_s=10.0, **kwargs):
    """1.0 if the completion's answer is mathematically equal to the gold answer, else 0.0."""
    golds = [None if a is None else str(a) for a in answer]
    golds = [extract_gsm8k_gold(g) if g is not None and "####" in g else g for g in golds]
    todo = [i for i, g in enumerate(golds) if g and g.strip()]
    checked = math_equal_many([(golds[i], completion_text(completions[i])) for i in todo], timeout_s)
    scores = [None] * len(completions)
    for i, ok in zip(todo, checked):
        scores[i] = None if ok is None else float(ok)
    return scores


math_verify.handles_timeout = True
