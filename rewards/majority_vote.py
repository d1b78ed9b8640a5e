"""Majority-vote self-reward (MM-UPT): a group reward that uses no ground truth.

MM-UPT (Wei et al., arXiv 2505.22453, code ``waltonfuture/MM-UPT``; spec B Sec. 3).  The
function is called once per prompt group and sees only that group's completions:

1. each completion's answer is extracted (``extractor``; default the last ``\\boxed{}``);
2. the answers vote by exact string equality (after stripping outer whitespace); the most
   common one is the group's pseudo-label, ties going to the answer that appears first
   (``Counter.most_common`` order, as the official code);
3. a completion scores 1.0 when its answer is equivalent to the pseudo-label under
   math-verify (``equivalence: math_verify``, via :mod:`rlkit.mathverify`; ``exact`` for
   string equality), else 0.0.  An answer written differently but equal to the label
   (``0.5`` vs ``\\frac{1}{2}``) also scores 1, though it did not count for the label.

Options beyond the original (all documented, the first on by default):

* ``exclude_none_from_vote=True`` (our addition): completions without an answer do not
  vote and always score 0.  The original votes the literal string "None", so when most
  completions have no box the unboxed ones are *rewarded* (format failure wins); set
  ``False`` for that original behaviour.
* ``min_vote_share`` (default 0 = off, as the original): when the label's share of the
  group (votes / group size) is below it, the group gets no label and every sample 0.
* ``normalize_votes`` (default off): canonicalise answers (whitespace, ``\\left``/``\\right``,
  ``\\dfrac``, numbers as in :func:`rlkit.answers.normalize_number`) before voting.

Extractors: ``boxed`` (last ``\\boxed{}``), ``gsm8k`` (strict ``#### N``), ``last_number``
(last number in the text), ``first_char`` (first non-space character; the toy echo task),
``text`` (the stripped completion), or ``"package.module:fn"`` / ``"path/to/file.py:fn"``
for any ``fn(text) -> str | None``.

Logged sub-scores (``reward/majority_vote/<key>/mean`` and ``/std``; they never enter the reward):

* ``label_acc``: 1 when the group's pseudo-label equals the ground truth ``answer`` column
  (NaN when the dataset has none, or the group got no label), per sample, so its mean is
  the pseudo-label accuracy over labelled groups (groups are equal-sized);
* ``gt_acc``: whether the sample's own answer equals the ground truth (true accuracy;
  use ``reward.accuracy_key: majority_vote/gt_acc`` to log it as ``accuracy``);
* ``vote_share``: the label's share of the group (NaN without a label);
* ``labeled``: 1 when the group got a pseudo-label.

Caveat from the spec: the reward is meaningless with groups of one (e.g. validation with
n = 1); evaluate with ground truth (``eval.checker``).
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rlkit.answers import (completion_text, extract_gsm8k_flexible, extract_gsm8k_strict, extract_last_boxed,
                           normalize_number)
from rlkit.mathverify import math_equal_many

NONE = "None"  # how the original code spells a missing answer


def _first_char(text: Any) -> Optional[str]:
    s = completion_text(text).strip()
    return s[0] if s else None


def _text(text: Any) -> Optional[str]:
    s = completion_text(text).strip()
    return s or None


EXTRACTORS: Dict[str, Callable[[Any], Optional[str]]] = {
    "boxed": extract_last_boxed,
    "gsm8k": extract_gsm8k_strict,
    "last_number": extract_gsm8k_flexible,
    "first_char": _first_char,
    "text": _text,
}


@functools.lru_cache(maxsize=64)
def _resolve_named(spec: str) -> Callable[[Any], Optional[str]]:
    if spec in EXTRACTORS:
        return EXTRACTORS[spec]
    if ":" not in spec:
        raise ValueError(f"majority_vote: unknown extractor {spec!r}; built-in: {sorted(EXTRACTORS)}, "
                         "or give 'package.module:fn' / 'path/to/file.py:fn'")
    from rlkit.rewarding import _import_target, _is_file_spec, _load_file

    where, attr = spec.rsplit(":", 1)
    return _load_file(where, attr) if _is_file_spec(where) else _import_target(spec)


def resolve_extractor(extractor: Any) -> Callable[[Any], Optional[str]]:
    """A built-in extractor name, ``"module:fn"``, ``"file.py:fn"`` or a callable -> ``fn(text) -> str | None``."""
    if callable(extractor):
        return extractor
    return _resolve_named(str(extractor))


_SPACES = re.compile(r"\s+")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def normalize_answer(ans: str) -> str:
    """Light canonicalisation used by ``normalize_votes``."""
    s = _SPACES.sub("", ans)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("$", "")):
        s = s.replace(a, b)
    s = s.rstrip(".")
    return normalize_number(s) if s and any(ch.isdigit() for ch in s) and _NUMBER.fullmatch(s) else s


def vote(answers: Sequence[Optional[str]], exclude_none_from_vote: bool = True,
         min_vote_share: float = 0.0) -> Tuple[Optional[str], float]:
    """(pseudo-label, its share of the group) from extracted answers (``None`` = no answer).

    Ties go to the answer seen first.  The label is ``None`` when nobody voted or the
    share is below ``min_vote_share``; with ``exclude_none_from_vote=False`` missing
    answers vote as the string ``"None"`` (and that string can win)."""
    n = len(answers)
    votes = [NONE if a is None else a for a in answers]
    if exclude_none_from_vote:
        votes = [a for a in answers if a is not None]
    if not votes:
        return None, 0.0
    label, count = Counter(votes).most_common(1)[0]  # insertion order breaks ties: the first seen wins
    share = count / n
    if share < min_vote_share:
        return None, share
    return label, share


def _check_pairs(pairs: List[Tuple[str, str]], equivalence: str, timeout_s: float) -> List[bool]:
    """(gold, answer) -> equal?  Exact matches never reach math-verify."""
    out = [g == a for g, a in pairs]
    if equivalence == "exact":
        return out
    todo = [i for i, (g, a) in enumerate(pairs) if not out[i] and NONE not in (g, a)]
    if todo:
        res = math_equal_many([(pairs[i][0], "\\boxed{" + pairs[i][1] + "}") for i in todo], timeout_s)
        for i, ok in zip(todo, res):
            out[i] = bool(ok)  # None (timeout / unparseable) counts as not equal
    return out


def majority_vote(completions, answer=None, extractor="boxed", exclude_none_from_vote=True, min_vote_share=0.0,
                  equivalence="math_verify", normalize_votes=False, log_ground_truth=True, timeout_s=10.0, **kwargs):
    """Group reward: 1.0 for completions whose answer is equivalent to the group's majority answer.

    Returns ``{"score": [...], "label_acc": [...], "gt_acc": [...], "vote_share": [...], "labeled": [...]}``;
    only ``score`` is the reward (the rest is logged)."""
    if equivalence not in ("math_verify", "exact"):
        raise ValueError(f"majority_vote: equivalence must be 'math_verify' or 'exact', got {equivalence!r}")
    if not 0.0 <= float(min_vote_share) <= 1.0:
        raise ValueError(f"majority_vote: min_vote_share must be in [0, 1], got {min_vote_share}")
    fn = resolve_extractor(extractor)
    n = len(completions)
    answers: List[Optional[str]] = []
    for c in completions:
        a = fn(completion_text(c))
        a = None if a is None else str(a).strip()
        if a is not None and normalize_votes:
            a = normalize_answer(a)
        answers.append(a or None)
    label, share = vote(answers, exclude_none_from_vote, float(min_vote_share))

    # one batch of checks: sample answers vs the label, the label and the answers vs the ground truth
    pairs: List[Tuple[str, str]] = []
    uniq = list(dict.fromkeys(a for a in answers if a is not None))
    if label is not None:
        label_pairs = {a: len(pairs) + j for j, a in enumerate(uniq)}
        pairs += [(label, a) for a in uniq]
    gts = list(answer) if (answer is not None and log_ground_truth) else [None] * n
    gt_pairs: Dict[Tuple[str, str], int] = {}
    for i in range(n):
        g = gts[i]
        if g is None or not str(g).strip():
            continue
        for a in ([answers[i]] if answers[i] is not None else []) + ([label] if label not in (None, NONE) else []):
            key = (str(g).strip(), a)
            if key not in gt_pairs:
                gt_pairs[key] = len(pairs)
                pairs.append(key)
    ok = _check_pairs(pairs, equivalence, float(timeout_s))

    score, label_acc, gt_acc = [], [], []
    for i, a in enumerate(answers):
        if label is None:
            s = 0.0
        elif a is None:
            s = 1.0 if label == NONE else 0.0  # only with exclude_none_from_vote=False (original behaviour)
        else:
            s = 1.0 if ok[label_pairs[a]] else 0.0
        score.append(s)
        g = gts[i]
        if g is None or not str(g).strip():
            label_acc.append(math.nan)
            gt_acc.append(math.nan)
            continue
        g = str(g).strip()
        label_acc.append(math.nan if label is None else 0.0 if label == NONE else float(ok[gt_pairs[(g, label)]]))
        gt_acc.append(float(ok[gt_pairs[(g, a)]]) if a is not None else 0.0)
    labeled = 1.0 if label is not None else 0.0
    return {"score": score, "label_acc": label_acc, "gt_acc": gt_acc,
            "vote_share": [share if label is not None else math.nan] * n, "labeled": [labeled] * n}


majority_vote.group_reward = True
