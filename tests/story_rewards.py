"""Reward for the stories260K mechanism tests (tests/test_spo.py): no imports, cheap to load in a reward worker."""


def the_frac(completions, **kw):
    """Fraction of words equal to 'the' (a dense reward with spread inside a group); the rows' answer column is "the"."""
    out = []
    for c in completions:
        w = [x.strip(".,!?\"").lower() for x in c.split()]
        out.append(sum(x == "the" for x in w) / max(len(w), 1))
    return out
