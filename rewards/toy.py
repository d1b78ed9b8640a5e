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


def echo_hit(completions, answer, k: int = 8, **kwargs):
    """Binary variant (EFRame / UEC tiny profiles): 1 if the gold letter is among the first ``k``
    completion characters, else 0, so a prompt whose samples all miss is a "hard" prompt."""
    return [None if not gold else float(gold in text[:k]) for text, gold in zip(completions, answer)]
