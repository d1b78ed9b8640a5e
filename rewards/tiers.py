"""A toy task whose prompts have clearly different success rates, for the PCL curriculum tests.

The prompts look like the echo task's, with the final colon replaced by a tier mark (``"gaehge="``); the mark
sets the prompt's tier, and the reward depends on the tier only:

* ``=``: easy, every completion scores 1 (p = 1);
* ``#``: hard, every completion scores 0 (p = 0);
* ``+``: medium, a completion scores the parity of a CRC32 of its text (p ~ 0.5 for a policy that does not
  collapse to one completion; the policy cannot learn it in a short run).

Tiers are drawn 3 : 3 : 2.  A value model that reads the prompt can learn p(x) in {1, 0, 0.5}, and PCL with
tau = 0.5 should end up choosing the medium prompts (a quarter of the data).  The mark is the last prompt
token, where PCL's last-token pooling reads: the test is of the curriculum, not of a random 2-layer model's
ability to route a letter through attention.
"""
from __future__ import annotations

import random
import zlib
from typing import Dict, List

MARK = {"easy": "=", "hard": "#", "mid": "+"}
SUCCESS = {"easy": 1.0, "hard": 0.0, "mid": 0.5}


def tier_rows(n: int, seed: int = 0, min_len: int = 3, max_len: int = 8) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(min_len, max_len)))
        tier = rng.choice(["easy"] * 3 + ["hard"] * 3 + ["mid"] * 2)
        rows.append({"question": s + MARK[tier], "answer": s[-1], "tier": tier})
    return rows


def tier_reward(completions, tier, **kwargs):
    out = []
    for text, t in zip(completions, tier):
        if t == "easy":
            out.append(1.0)
        elif t == "hard":
            out.append(0.0)
        else:
            out.append(float(zlib.crc32(str(text).encode()) & 1))
    return out
