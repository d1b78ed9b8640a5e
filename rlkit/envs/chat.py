"""Chat-template rendering of observation messages between model turns.

An observation (tool results, a simulated user) must be appended as exactly the tokens the chat
template would produce at that place of the conversation, followed by the generation prompt of the
next assistant turn.  The template is rendered twice on a fixed dummy conversation, without and with
the observation messages, and the difference is the observation text (verl's agent loop and TRL's
multi-turn tooling use the same trick).  The policy's tokens are never re-tokenized: the context is
the concatenation of token ids.
"""
from __future__ import annotations

from typing import Any, Dict, List

_MARK = "\u2063RLKIT_TURN_END\u2063"


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


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
