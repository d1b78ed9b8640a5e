"""Dense toy rewards for the trainer-level mechanism tests (test_compose.py, test_dump.py): no imports."""

EARLY = set("abcdefghijklm")


def first_early(completions, level=None, **kw):
    """1.0 when the completion's first character is one of a..m, else 0.0 (on the untrained toy model about a
    third of the samples, so most groups have spread and the reward depends on the first token only, so the
    prefix tree branches at the root).  Rows whose ``level`` column is "dead" always score 0 (no signal)."""
    levels = level if level is not None else [None] * len(completions)
    return [0.0 if lv == "dead" else float(c[:1] in EARLY) for c, lv in zip(completions, levels)]


def char_class(text):
    """MM-UPT extractor for the toy model: the class of the first non-space character (a-m, n-z, digit, other), so
    that a group of 4 samples usually has a strict majority answer and a minority."""
    s = str(text).strip()
    if not s:
        return None
    c = s[0]
    return "early" if c in EARLY else "late" if c.isalpha() else "digit" if c.isdigit() else "other"
