"""Answer extraction and checking for GSM8K- and MATH-style tasks (pure functions).

GSM8K follows verl's ``gsm8k.py``: *strict* takes the last ``#### <number>`` in the
last 300 characters; *flexible* takes the last number anywhere in the text.  MATH
answers are read from the last ``\\boxed{...}`` (balanced braces).  Symbolic
equivalence (``\\frac{1}{2}`` vs ``0.5``) lives in :mod:`rlkit.mathverify`, which runs
math-verify in worker processes.

    >>> extract_gsm8k_strict("so 3 + 4 = 7\\n#### 1,234")
    '1234'
    >>> extract_gsm8k_flexible("The answer is $5.")
    '5'
    >>> extract_last_boxed("\\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

STRICT_TAIL_CHARS = 300  # verl's _SOLUTION_CLIP_CHARS: strict extraction looks only at the tail

# a number: thousands-grouped ("1,234,567") or plain ("1234", "3.5", ".5"); not glued to a digit/dot on its left
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(r"(?<![\d.])(?:" + _NUMBER + r")")
_STRICT_RE = re.compile(r"####\s*\$?\s*(-?[0-9.,]+)")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or a conversation (list of ``{"content": ...}``) -> last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return "" if completion is None else str(completion)


def _clean_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "")
    return s.rstrip(".")


def normalize_number(s: Any) -> str:
    """Canonical text of a number: ``"1,000"`` -> ``"1000"``, ``"3.0"`` -> ``"3"``, ``"-0"`` -> ``"0"``, ``"$5"`` -> ``"5"``.

    Text that is not a number comes back stripped of commas, ``$``, spaces and a trailing dot.
    """
    s = _clean_number(str(s))
    try:
        d = Decimal(s)
    except (InvalidOperation, ValueError):
        return s
    if not d.is_finite():
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def numbers_equal(a: Any, b: Any) -> bool:
    """Numeric equality after :func:`normalize_number` (``"0.50"`` == ``".5"``); text compares as strings."""
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    if na == nb:
        return True
    try:
        return Decimal(na) == Decimal(nb)
    except (InvalidOperation, ValueError):
        return False


def extract_gsm8k_gold(answer_text: Any) -> str:
    """The gold answer of a GSM8K ``answer`` field: the text after the last ``####``.

    Commas, ``$`` and spaces are stripped and a trailing ``.`` removed.  Text without
    ``####`` is returned cleaned the same way (it is taken to be the answer already).
    """
    text = str(answer_text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return _clean_number(text)


def extract_gsm8k_strict(completion: Any) -> Optional[str]:
    """The last ``#### <number>`` in the last 300 characters (commas and ``$`` stripped), or None."""
    text = completion_text(completion)[-STRICT_TAIL_CHARS:]
    for m in reversed(_STRICT_RE.findall(text)):
        ans = _clean_number(m)
        if ans not in ("", "-") and any(ch.isdigit() for ch in ans):
            return ans
    return None


def extract_gsm8k_flexible(completion: Any) -> Optional[str]:
    """The last number anywhere in the text (commas and ``$`` stripped), or None."""
    matches = _NUMBER_RE.findall(completion_text(completion))
    return _clean_number(matches[-1]) if matches else None


def extract_last_boxed(text: Any) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of ``\\boxed 5``.

    Returns None when there is no box, or when the last box is never closed
    (a truncated completion).
    """
    text = completion_text(text)
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        if i == matches[-1].end():  # "\boxedx" glued to other text: not a box
            return None
        rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
        return rest or None
    depth = 0
    for j in range(i, n):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None
