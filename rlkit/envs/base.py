"""The ``environment`` hook: what happens between two model turns.

An environment is a class registered with ``@register_environment("name")`` (or loaded from
``"file.py:Class"``) and built as ``cls(params, ctx)`` like every plugin.  Per episode (one sampled
conversation) the ``multi_turn`` rollout strategy calls::

    state = env.reset(row)                  # row: the dataset row (every column)
    res = env.step(state, turn_text)        # after each model turn -> StepResult
    final = env.final_reward(state)         # once, when the episode ends (None = no final reward)

``StepResult.observation`` is appended to the context and masked out of the loss: a ``str`` is
tokenized as is (plain-text models), a message ``{"role": "tool" | "user", "content": ...}`` or a list
of them goes through the tokenizer's chat template.  ``StepResult.reward`` is a per-turn reward;
``done`` ends the episode.  The episode's reward is the sum of its per-turn rewards plus the final
reward; reward functions read it as the ``env_reward`` column (the built-in ``env_reward`` reward
returns it) next to every other column, so it combines with ordinary reward functions.

``tools`` (a list of callables) reach the model through the chat template's ``tools=`` and are run by
:class:`ToolEnvironment` (registered as ``tools``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from ..plugins import Plugin
from ..registry import register_environment, register_reward

Observation = Union[None, str, Dict[str, Any], List[Dict[str, Any]]]


@dataclass
class StepResult:
    observation: Observation = None
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0          # counted in rollout/tool_calls
    tool_errors: int = 0         # malformed calls, unknown tools, exceptions inside a tool


class Environment(Plugin):
    """Base class; override :meth:`reset` and :meth:`step` (and :meth:`final_reward` if needed)."""

    tools: List[Callable] = []          # exposed through the chat template's tools=
    stop: List[str] = []                # extra stop strings that end a model turn
    role: str = "user"                  # role of a plain-string observation when a chat template renders it
    max_workers: int = 1                # > 1: step() runs for several episodes at once in threads (must be thread-safe)

    def reset(self, row: Dict[str, Any]) -> Any:
        return {"row": row}

    def step(self, state: Any, text: str) -> StepResult:
        raise NotImplementedError

    def final_reward(self, state: Any) -> Optional[float]:
        return None


@register_reward("env_reward")
def env_reward(completions, env_reward=None, **kwargs):
    """The multi-turn environment's episode reward (sum of per-turn rewards + final reward)."""
    if env_reward is None:
        raise ValueError("env_reward: no env_reward column (use it with rollout.strategy: multi_turn)")
    return list(env_reward)


env_reward.group_reward = False


@register_environment("tools")
class ToolEnvironment(Environment):
    """Tool calling: each model turn is parsed for tool calls (``parser``); every call is run and its
    result (or error) returned as a ``tool`` message.  A turn without a tool call is the final answer
    and ends the episode (reward functions then score the conversation).  A malformed call, an unknown
    tool or an exception inside a tool returns an error observation and is counted, never raised."""

    @dataclass
    class Params:
        tools: List[Any] = field(default_factory=lambda: ["python"])   # names, "file.py:fn" or callables
        parser: str = "hermes"
        max_result_chars: int = 2000
        max_workers: int = 8                                           # episodes whose tool calls run at once (threads)

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        from ..registry import TOOL_PARSERS
        from ..tools import resolve_tool, tool_schema

        p = self.params
        self.parser = TOOL_PARSERS.get(p.parser, "rollout.strategy.env_args.parser")()
        self.tools = [resolve_tool(t) for t in p.tools]
        self.schemas = [tool_schema(t) for t in self.tools]   # fails early on an undocumented tool
        self.by_name = {s["function"]["name"]: t for s, t in zip(self.schemas, self.tools)}
        self.stop = list(getattr(self.parser, "stop", []))
        self.role = "tool"
        self.max_workers = p.max_workers

    def step(self, state, text: str) -> StepResult:
        parsed = self.parser.parse(text)
        if not parsed.calls and not parsed.errors:
            return StepResult(done=True)
        msgs, errors = [], len(parsed.errors)
        for e in parsed.errors:
            msgs.append({"role": "tool", "content": f"Error: {e}"})
        for call in parsed.calls:
            fn = self.by_name.get(call.name)
            if fn is None:
                errors += 1
                msgs.append({"role": "tool", "content": f"Error: unknown tool {call.name!r}; "
                                                        f"available: {sorted(self.by_name)}"})
                continue
            try:
                out = str(fn(**call.arguments))
            except Exception as e:  # noqa: BLE001 - a tool's failure is an observation, not a crash
                errors += 1
                out = f"Error: {type(e).__name__}: {e}"
            msgs.append({"role": "tool", "content": out[: self.params.max_result_chars]})
        return StepResult(observation=msgs, tool_calls=len(parsed.calls) + len(parsed.errors), tool_errors=errors)
