"""Chat-template rendering of observation messages between model turns.

An observation (tool results, a simulated user) must be appended as exactly the tokens the chat
template would produce at that place of the conversation, followed by the generation prompt of the
next assistant turn.  The template is rendered twice on a fixed dummy conversation, without and with
the observation messages, and the difference is the observation text (verl's agent loop and TRL's
multi-turn tooling use the same trick).  The policy's tokens are never re-tokenized: the context is
the concatenation of token ids.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

_MARK = "\u2063RLKIT_TURN_END\u2063"
_PROBE = "rlkit_probe_tool"

# Qwen2.5's tool preamble (Hermes format): what a template without tools= support gets in its system message
TOOLS_SYSTEM = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}}\n</tool_call>")


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def template_renders_tools(tok) -> bool:
    """Whether the chat template uses ``tools=`` at all (SmolLM2's, for one, silently ignores it)."""
    probe = {"type": "function", "function": {"name": _PROBE, "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[probe], tokenize=False,
                                       add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that chokes on tools= does not support them either
        return False
    return _PROBE in text


def tools_in_system_message(prompt: Any, schemas: List[Dict[str, Any]], system_prompt: Optional[str] = None
                            ) -> List[Dict[str, Any]]:
    """The prompt as messages whose system message carries the tools' schemas in the Hermes format
    (:data:`TOOLS_SYSTEM`, appended to the prompt's own or ``data.system_prompt``'s system text): how the tools
    reach a model whose chat template ignores ``tools=``."""
    msgs = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    block = TOOLS_SYSTEM.format(tools="\n".join(json.dumps(s) for s in schemas))
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{block}"
    else:
        msgs.insert(0, {"role": "system", "content": f"{system_prompt}\n\n{block}" if system_prompt else block})
    return msgs


def observation_text(tok, messages: List[Dict[str, Any]], turn_ended_with_eos: bool) -> str:
    """The text that follows an assistant turn and carries ``messages``, up to the next assistant
    generation prompt.  ``turn_ended_with_eos``: the turn's last token was the end-of-turn token (else
    it stopped at a stop string such as ``</tool_call>`` and the template's end-of-turn text is
    included here, as an observation token)."""
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
    after = tok.apply_chat_template(base + list(messages), tokenize=False, add_generation_prompt=True)
    k = after.rfind(_MARK)   # (templates such as Qwen3's render the earlier assistant turn differently; only the tail counts)
    if k < 0:
        raise ValueError("the chat template drops the assistant turn's content; cannot append observations")
    tail = after[k + len(_MARK):]
    eos = tok.eos_token or ""
    if turn_ended_with_eos and eos and tail.startswith(eos):
        tail = tail[len(eos):]
    return tail
