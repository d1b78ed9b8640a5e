"""Tools a policy may call during a multi-turn rollout, and the parsers that find the calls.

A tool is a plain Python function with type hints and a Google-style docstring; its JSON schema
comes from :func:`transformers.utils.get_json_schema` (the same schema the tokenizer's chat template
receives through ``tools=``).  Register one with ``@register_tool("name")`` (or name it in a recipe
as ``"file.py:fn"``).  A tool returns text (anything else is ``str()``-ed); an exception raised inside it
becomes an error observation (counted as a tool error), never a crash.

Parsers (``@register_tool_parser``) turn a model turn into tool calls.  Built-in: ``hermes``, the
Hermes / Qwen format ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ..registry import PluginError, TOOLS, register_tool, register_tool_parser

__all__ = ["ToolCall", "ParsedTurn", "HermesParser", "tool_schema", "resolve_tool", "calculator", "python"]


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]


@dataclass
class ParsedTurn:
    calls: List[ToolCall] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)   # malformed calls (one message each)


def tool_schema(fn: Callable) -> Dict[str, Any]:
    """The OpenAI-style function schema of ``fn`` from its signature and docstring."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers raises its own TypeError subclasses
        raise PluginError(f"tool {getattr(fn, '__name__', fn)!r}: cannot build its JSON schema from the signature "
                          f"and docstring: {str(e).splitlines()[0]}") from None


def _load_file_fn(spec: str) -> Callable:
    path, _, name = spec.rpartition(":")
    if path.endswith(".py"):
        if not os.path.exists(path):
            raise PluginError(f"tool {spec!r}: file {path} not found (relative to {os.getcwd()})")
        mod_name = "rlkit_user_tool_" + re.sub(r"\W", "_", os.path.abspath(path))
        s = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(path)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise PluginError(f"tool {spec!r}: {path} has no function {name!r}")
    return fn


def resolve_tool(spec: Any) -> Callable:
    """A registered tool name, ``"file.py:fn"``, ``"package.module:fn"`` or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec:
        return _load_file_fn(spec)
    return TOOLS.get(str(spec), "tools")


# ------------------------------------------------------------------- parsers
@register_tool_parser("hermes")
class HermesParser:
    """``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5/Qwen3 chat templates), or a
    JSON list of such objects in one tag (SmolLM2).  A turn ends at the closing tag (``stop``), so the model gets
    the result before it goes on."""

    stop = ["</tool_call>"]
    _re = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> ParsedTurn:
        out = ParsedTurn()
        for m in self._re.finditer(text):
            body = m.group(1).strip()
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                out.errors.append(f"malformed tool call (invalid JSON: {e.msg})")
                continue
            # one call, or a list of calls in one tag (SmolLM2's function-calling format)
            for one in (obj if isinstance(obj, list) and obj else [obj]):
                self._add(out, one)
        return out

    @staticmethod
    def _add(out: ParsedTurn, obj: Any) -> None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            out.errors.append('malformed tool call (expected {"name": ..., "arguments": {...}})')
            return
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models emit the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                out.errors.append(f"malformed tool call to {obj['name']!r} (arguments are not a JSON object)")
                return
        if not isinstance(args, dict):
            out.errors.append(f"malformed tool call to {obj['name']!r} (arguments are not a JSON object)")
            return
        out.calls.append(ToolCall(obj["name"], args))


# ------------------------------------------------------------------- built-in tools
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval_node(n):
    if isinstance(n, ast.Expression):
        return _eval_node(n.body)
    if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
        return n.value
    if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
        left, right = _eval_node(n.left), _eval_node(n.right)
        if isinstance(n.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPS[type(n.op)](left, right)
    if isinstance(n, ast.UnaryOp) and type(n.op) in _OPS:
        return _OPS[type(n.op)](_eval_node(n.operand))
    raise ValueError(f"unsupported expression element {type(n).__name__}")


@register_tool("calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: The arithmetic expression, e.g. "(3 + 4) * 2".
    """
    v = _eval_node(ast.parse(expression.strip(), mode="eval"))
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


@register_tool("python")
def python(code: str) -> str:
    """Run Python code in a sandbox (no network, limited CPU time and memory, a temporary working directory)
    and return what it prints.

    Args:
        code: The Python program to run; print the values you need.
    """
    from .sandbox import run_python

    return run_python(code).observation()
