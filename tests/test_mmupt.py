"""MM-UPT majority-vote reward: spec B 3.6 worked example, ties, missing answers, vote share,
pseudo-label accuracy logging, pluggable extractors, and an end-to-end tiny run."""
import math

import pytest
import torch

from rlkit.algorithms.mmupt import majority_vote, resolve_extractor, vote
from tests.conftest import launch_recipe

SPEC = ["3", "3", "4", "3", "None", "4", "3", "5", "3", "4"]


def boxed(answers):
    return [f"so the answer is \\boxed{{{a}}}" if a != "None" else "I am not sure." for a in answers]


def test_spec_example_rewards_and_grpo_advantages():
    out = majority_vote(boxed(SPEC), equivalence="exact")
    assert out["score"] == [1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    assert sum(out["score"]) / 10 == 0.5
    assert out["vote_share"][0] == pytest.approx(0.5) and out["labeled"] == [1.0] * 10
    from rlkit.batch import Batch
    from rlkit.objectives.grpo import GRPO

    b = Batch(prompt_ids=[[1]] * 10, response_ids=torch.ones(10, 1, dtype=torch.long), response_mask=torch.ones(10, 1),
              group_ids=torch.zeros(10, dtype=torch.long), rewards=torch.tensor(out["score"]))
    GRPO(GRPO.Params(eps=1e-6))(b)
    A = b.advantages[:, 0]
    assert A[torch.tensor(out["score"]) > 0].tolist() == pytest.approx([0.948681] * 5, abs=1e-6)
    assert A[torch.tensor(out["score"]) == 0].tolist() == pytest.approx([-0.948681] * 5, abs=1e-6)


def test_tie_goes_to_first_seen():
    assert vote(["2", "5", "2", "5"]) == ("2", 0.5)
    assert majority_vote(boxed(["2", "5", "2", "5"]), equivalence="exact")["score"] == [1, 0, 1, 0]
    assert majority_vote(boxed(["5", "2", "2", "5"]), equivalence="exact")["score"] == [1, 0, 0, 1]


def test_missing_answers():
    answers = ["None", "None", "None", "2", "3"]
    # default (our addition): missing answers do not vote and score 0; "2" wins the 1-1 tie by order
    assert majority_vote(boxed(answers), equivalence="exact")["score"] == [0, 0, 0, 1, 0]
    # the original: "None" votes, wins, and rewards the unboxed completions
    out = majority_vote(boxed(answers), equivalence="exact", exclude_none_from_vote=False)
    assert out["score"] == [1, 1, 1, 0, 0]
    assert vote([None, None, "2"], exclude_none_from_vote=False) == ("None", pytest.approx(2 / 3))
    # nobody answered: no label, every sample 0 (a zero-variance group: no gradient)
    out = majority_vote(boxed(["None"] * 4), equivalence="exact")
    assert out["score"] == [0.0] * 4 and out["labeled"] == [0.0] * 4 and all(math.isnan(x) for x in out["vote_share"])


def test_min_vote_share():
    assert majority_vote(boxed(["2", "5", "2", "5"]), equivalence="exact", min_vote_share=0.6)["score"] == [0.0] * 4
    assert majority_vote(boxed(["2", "2", "2", "5"]), equivalence="exact", min_vote_share=0.6)["score"] == [1, 1, 1, 0]
    # the share counts the whole group, missing answers included
    assert vote(["2", "2", None, None], min_vote_share=0.6) == (None, 0.5)
    with pytest.raises(ValueError):
        majority_vote(boxed(["2"]), min_vote_share=1.5)


def test_math_verify_equivalence_and_label_accuracy():
    comps = boxed(["\\frac{1}{2}", "\\frac{1}{2}", "0.5", "2", "None"])
    out = majority_vote(comps, answer=["0.5"] * 5)                 # math-verify (worker processes)
    assert out["score"] == [1, 1, 1, 0, 0]                         # "0.5" did not vote but equals the label
    assert out["label_acc"] == [1.0] * 5                           # pseudo-label == ground truth
    assert out["gt_acc"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    out = majority_vote(boxed(["3", "3", "4"]), answer=["4"] * 3, equivalence="exact")
    assert out["label_acc"] == [0.0] * 3 and out["gt_acc"] == [0.0, 0.0, 1.0]
    out = majority_vote(boxed(["3", "3", "4"]), equivalence="exact")  # no answer column: NaN, not 0
    assert all(math.isnan(x) for x in out["label_acc"])


def test_normalize_votes():
    comps = boxed(["1,000", "1000", "\\dfrac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"])
    assert majority_vote(comps, equivalence="exact")["score"] == [0, 0, 0, 1, 1]
    assert majority_vote(comps, equivalence="exact", normalize_votes=True)["score"] == [0, 0, 1, 1, 1]


def test_pluggable_extractors(tmp_path):
    texts = ["#### 7", "the answer is 7", "x 8", "hello"]
    assert [resolve_extractor("gsm8k")(t) for t in texts] == ["7", None, None, None]
    assert [resolve_extractor("last_number")(t) for t in texts] == ["7", "7", "8", None]
    assert [resolve_extractor("first_char")(t) for t in [" ab", "", "z"]] == ["a", None, "z"]
    assert resolve_extractor("rlkit.answers:extract_gsm8k_flexible")("a 12 b") == "12"
    f = tmp_path / "ext.py"
    f.write_text("def last_word(text):\n    w = text.split()\n    return w[-1] if w else None\n")
    assert majority_vote(["a b", "c b", "b"], extractor=f"{f}:last_word", equivalence="exact")["score"] == [1, 1, 1]
    assert majority_vote(["x", "y"], extractor=lambda t: t, equivalence="exact")["score"] == [1, 0]
    with pytest.raises(ValueError, match="unknown extractor"):
        resolve_extractor("nope")


def test_rewarder_logs_label_accuracy_and_validates_params():
    from rlkit.config import ConfigError, RewardConfig
    from rlkit.rewarding import Rewarder, validate_reward_specs

    spec = {"name": "majority_vote", "extractor": "first_char", "equivalence": "exact"}
    rw = Rewarder(RewardConfig(functions=[spec]))
    comps = ["ab", "ac", "bd", "xy", "xz", "yq"]
    res = rw(prompts=[""] * 6, completions=comps, columns={"answer": ["a"] * 3 + ["y"] * 3}, group_ids=[0, 0, 0, 1, 1, 1])
    assert res.rewards.tolist() == [1, 1, 0, 1, 1, 0]
    assert res.components["majority_vote/label_acc"].tolist() == [1, 1, 1, 0, 0, 0]
    assert res.components["majority_vote/label_acc"].nanmean().item() == pytest.approx(0.5)
    assert res.components["majority_vote/gt_acc"].tolist() == [1, 1, 0, 0, 0, 1]
    validate_reward_specs(RewardConfig(functions=[{**spec, "min_vote_share": 0.3, "exclude_none_from_vote": False}]))
    with pytest.raises(ConfigError, match="exclude_none"):
        validate_reward_specs(RewardConfig(functions=[{"name": "majority_vote", "exclude_none": True}]))


def test_e2e_tiny_recipe(tmp_path, toy_model_dir):
    m, _ = launch_recipe("mmupt", tmp_path)
    assert len(m) == 16
    for k in ("reward/majority_vote/mean", "reward/majority_vote/label_acc/mean", "reward/majority_vote/vote_share/mean", "accuracy"):
        assert all(k in r for r in m), k
    r = [x["reward/mean"] for x in m]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.1, r      # the policy learns to agree with itself


def test_rewards_follow_the_groups_majority_in_training(tmp_path, echo_rows):
    """Trainer-level mechanism test (issue 10): in every group the rewarded samples are exactly those whose answer
    is the group's most common answer, so the mean reward equals the logged vote share.  Catches the pseudo-label
    replaced by a constant or a random answer (docs/methods/mmupt.md)."""
    import json
    import os
    from collections import Counter, defaultdict

    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import read_metrics, tiny_overrides

    from tests.conftest import REPO
    from tests.mechanism_rewards import char_class

    ext = str(REPO / "tests" / "mechanism_rewards.py") + ":char_class"
    reward = "[{name: majority_vote, extractor: '" + ext + "', equivalence: exact}]"
    tr = Trainer(load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 2, "reward.functions": reward})),
                 train_rows=echo_rows)
    tr.train()
    m = read_metrics(tr.run_dir)
    for r in m:
        assert r["reward/majority_vote/mean"] == pytest.approx(r["reward/majority_vote/vote_share/mean"], abs=1e-6)
    groups = defaultdict(list)
    for c in (json.loads(line) for line in open(os.path.join(tr.run_dir, "completions.jsonl"))):
        groups[(c["step"], c["group"])].append(c)
    assert len(groups) == 2 * 4
    split = 0
    for rows in groups.values():
        firsts = [char_class(c["completion"]) for c in rows]
        top, n_top = Counter(a for a in firsts if a).most_common(1)[0]
        rewarded = {a for a, c in zip(firsts, rows) if c["reward/majority_vote"] == 1.0}
        assert sum(c["reward/majority_vote"] for c in rows) == n_top       # the label is a most common answer
        assert len(rewarded) == 1 and Counter(firsts)[rewarded.pop()] == n_top
        split += any(0 < k < n_top for k in Counter(firsts).values())
    assert split >= 2       # groups with a strict majority over a minority: the vote decides who is rewarded
