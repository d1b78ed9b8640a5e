"""Reward for the toy echo task (quickstart and tests): the fraction of the
first ``k`` completion characters that equal the gold letter (``answer``)."""


def echo(completions, answer, k: int = 8, **kwargs):
    out = []
    for text, gold in zip(completions, answer):
        if not gold:
            out.append(None)
            continue
        head = text[:k]
        out.append(sum(ch == gold for ch in head) / k)
    return out
