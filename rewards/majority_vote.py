"""Majority-vote self-reward (MM-UPT): no ground truth needed.

A *group* reward: it is called once per prompt group and sees only that group's
completions.  For each completion, take the content of the last ``\\boxed{}``
("None" when there is none).  The majority answer is the most common string
(exact match; on a tie the one that appears first wins).  A completion scores 1.0
if its answer equals the majority (exactly, or per math-verify), else 0.0.

``exclude_none=True`` leaves "None" out of the vote (not in the original method).
"""
from collections import Counter

from rlkit.answers import extract_last_boxed
from rlkit.mathverify import math_equal_many


def majority_vote(completions, exclude_none=False, timeout_s=10.0, **kwargs):
    """1.0 for completions whose boxed answer equals the group's majority answer, else 0.0."""
    answers = [extract_last_boxed(c) for c in completions]
    answers = ["None" if a is None else a for a in answers]
    votes = [a for a in answers if not (exclude_none and a == "None")]
    if not votes:
        return [0.0] * len(answers)
    majority = Counter(votes).most_common(1)[0][0]  # Counter keeps first-seen order, so ties go to the first
    # exact matches score 1; other real answers may still be equal (e.g. "0.5" vs "\frac{1}{2}")
    to_check = [i for i, a in enumerate(answers) if a != majority and "None" not in (a, majority)]
    checked = math_equal_many([(majority, "\\boxed{" + answers[i] + "}") for i in to_check], timeout_s)
    scores = [1.0 if a == majority else 0.0 for a in answers]
    for i, ok in zip(to_check, checked):
        scores[i] = 1.0 if ok else 0.0
    return scores


majority_vote.group_reward = True
