"""Multi-turn environments (``environment`` hook) and the ``multi_turn`` rollout strategy."""
from .base import Environment, StepResult, ToolEnvironment, env_reward  # noqa: F401
from .guess_number import GuessNumber  # noqa: F401
from .multi_turn import MultiTurn  # noqa: F401
