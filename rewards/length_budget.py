"""Triangular length reward around a token budget L ("Train Long, Think Short", arXiv 2508.08940).

    R(l) = r_max * l / L              for l <= L
           r_max * (1 - (l - L) / L)   for L < l <= 2L
           0                           for l > 2L

``l`` is the completion length in tokens (``completion_ids``; characters when the ids are
not given) -- the whole completion, not only a ``<think>`` span ([INFERRED]: the paper is
ambiguous).  The budget L comes from the ``length_budget`` controller, which binds
``budget=B(t)`` before every step (``rlkit/algorithms/length_curriculum.py``); a fixed
budget (the paper's fixed-87-token baseline) is a recipe parameter::

    reward:
      functions: [{name: gsm8k_strict, weight: 0.6}, {name: length_budget, weight: 0.3, budget: 87}]

A dataset column named ``budget`` also works (one budget per prompt).
"""


def triangular_length_reward(length, budget, r_max=1.0):
    """R_max * l / L up to L, falling linearly to 0 at 2L, 0 beyond."""
    if budget <= 0:
        raise ValueError(f"length_budget: the budget must be > 0, got {budget}")
    if length <= budget:
        return r_max * length / budget
    if length <= 2 * budget:
        return r_max * (1.0 - (length - budget) / budget)
    return 0.0


def length_budget(completions, completion_ids=None, budget=None, r_max=1.0, **kwargs):
    """Triangular length reward, peak ``r_max`` at ``budget`` tokens, 0 from twice the budget."""
    if budget is None:
        raise ValueError("length_budget: no budget given: add the length_budget controller to algorithm.controllers, "
                         "or bind a fixed one ({name: length_budget, budget: 87})")
    out = []
    for i, completion in enumerate(completions):
        n = len(completion_ids[i]) if completion_ids is not None else len(completion)
        b = budget[i] if isinstance(budget, (list, tuple)) else budget
        out.append(None if b is None else triangular_length_reward(n, float(b), r_max))
    return out
