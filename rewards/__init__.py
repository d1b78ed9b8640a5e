"""Built-in reward functions, installed as ``rlkit.builtin_rewards``.

Each file is a short, plain-Python example of the TRL reward convention: a function
``fn(completions, <dataset columns by name>, **kwargs) -> list[float | None]``.
Copy one next to your recipe, edit it, and point the recipe at it::

    reward:
      functions: ["my_rewards.py:my_reward"]

``None`` means "not applicable" (the sample is skipped by that function).
"""
