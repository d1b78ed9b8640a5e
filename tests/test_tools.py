"""Tools: schema from signature + docstring, the Hermes parser, the tool environment's error handling,
and the Python sandbox's limits (runaway loop, memory bomb, network, files outside its directory)."""
from __future__ import annotations

import os

import pytest

from rlkit.envs.base import ToolEnvironment
from rlkit.tools import HermesParser, calculator, tool_schema
from rlkit.tools.sandbox import ToolError, network_namespace_available, run_python


def lookup(city: str, year: int = 2020) -> str:
    """Population of a city.

    Args:
        city: The city's name.
        year: The census year.
    """
    return {"paris": "2.1M"}[city.lower()]


def test_schema_from_signature_and_docstring():
    s = tool_schema(lookup)
    assert s["function"]["name"] == "lookup"
    assert s["function"]["description"] == "Population of a city."
    props = s["function"]["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "The city's name."}
    assert props["year"]["type"] == "integer"
    assert s["function"]["parameters"]["required"] == ["city"]


def test_hermes_parser_calls_and_malformed():
    p = HermesParser()
    t = p.parse('let me compute <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>')
    assert [(c.name, c.arguments) for c in t.calls] == [("calculator", {"expression": "2+3"})] and not t.errors
    t = p.parse('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>')
    assert t.calls[0].arguments == {"expression": "1"}            # arguments given as a JSON string
    t = p.parse("<tool_call>{not json}</tool_call>")
    assert not t.calls and t.errors and "invalid JSON" in t.errors[0]
    assert p.parse("#### 42").calls == [] and p.parse("#### 42").errors == []
    t = p.parse('<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>')
    assert [(c.name, c.arguments) for c in t.calls] == [("a", {"x": 1}), ("b", {})]   # SmolLM2's list form
    t = p.parse('<tool_call>[{"name": "a", "arguments": {}}, 7]</tool_call>')
    assert len(t.calls) == 1 and len(t.errors) == 1


def test_calculator():
    assert calculator("(3 + 4) * 2") == "14"
    assert calculator("7 / 2") == "3.5"
    with pytest.raises(ValueError):
        calculator("__import__('os')")


def test_tool_environment_errors_are_observations_not_crashes():
    env = ToolEnvironment(ToolEnvironment.Params(tools=["calculator", lookup]))
    assert env.stop == ["</tool_call>"]
    ok = env.step({}, '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>')
    assert ok.observation == [{"role": "tool", "content": "42"}] and (ok.tool_calls, ok.tool_errors) == (1, 0)
    assert not ok.done
    bad = env.step({}, '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
                       '<tool_call>{"name": "lookup", "arguments": {"city": "Atlantis"}}</tool_call>'
                       '<tool_call>{broken</tool_call>')
    texts = [m["content"] for m in bad.observation]
    assert (bad.tool_calls, bad.tool_errors) == (3, 3)
    assert any("malformed tool call" in t for t in texts)
    assert any("unknown tool 'nope'" in t for t in texts)
    assert any(t.startswith("Error: KeyError") for t in texts)
    final = env.step({}, "The answer is #### 42")
    assert final.done and final.tool_calls == 0


# ------------------------------------------------------------------ sandbox
def test_sandbox_runs_code_in_a_temporary_directory():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\nprint(open('out.txt').read(), os.getcwd())")
    assert r.ok, r.output
    text, cwd = r.output.split()
    assert text == "hi" and os.path.basename(cwd).startswith("rlkit_sandbox_")
    assert not os.path.exists(cwd)                                # removed afterwards


def test_sandbox_runaway_loop_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", cpu_s=1, timeout_s=60)
    assert r.cpu_limited and not r.timed_out and r.returncode != 0
    with pytest.raises(ToolError, match="CPU time limit"):
        r.observation()


def test_sandbox_sleeping_loop_hits_the_wall_clock_limit():
    r = run_python("import time\nwhile True:\n    time.sleep(1)", timeout_s=1.5, cpu_s=30)
    assert r.timed_out
    with pytest.raises(ToolError, match="wall-clock"):
        r.observation()


def test_sandbox_memory_bomb_hits_the_memory_limit():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))", memory_mb=256)
    assert r.memory_error and r.returncode != 0, r.output
    with pytest.raises(ToolError, match="memory limit"):
        r.observation()


NET = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\n    print('CONNECTED')\n"
       "except OSError as e:\n    print('BLOCKED', type(e).__name__, e)\n")


def test_sandbox_network_attempt_is_refused_by_the_audit_hook():
    r = run_python(NET, network_namespace=False)
    assert "CONNECTED" not in r.output
    assert "PermissionError" in r.output and "network access is disabled" in r.output


def test_sandbox_network_namespace_alone_blocks_connections():
    if not network_namespace_available():
        pytest.skip("unshare -n is not permitted here; the audit hook is the only network guard")
    r = run_python(NET, audit_hook=False)
    assert "BLOCKED" in r.output and "CONNECTED" not in r.output and "unreachable" in r.output.lower(), r.output


def test_sandbox_refuses_writes_and_processes_outside_its_directory(tmp_path):
    target = tmp_path / "evil.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert not r.ok and "writing outside the sandbox directory" in r.output and not target.exists()
    r = run_python("import os\nos.system('echo hi')")
    assert not r.ok and "os.system is disabled" in r.output
