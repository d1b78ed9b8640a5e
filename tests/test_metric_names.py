"""TRL-compatible metric names (issue 13, item 9), checked against the completions of the same steps."""
import json
import os
import statistics

import pytest

from rlkit.config import load_config
from rlkit.metric_names import rename, rlkit_name, trl_name
from rlkit.trainer import Trainer
from tests.conftest import read_metrics, tiny_overrides


def test_mapping_by_hand():
    m = {"reward/mean": 0.5, "reward/echo/mean": 0.25, "reward/echo/std": 0.1, "reward/echo/errors": 0.0,
         "reward/echo/skipped_frac": 0.0, "reward/std": 0.3, "tempo/nodes": 3.0, "lr": 1e-3}
    both = rename(m, "both")
    assert both["reward"] == 0.5 and both["reward/mean"] == 0.5
    assert both["rewards/echo/mean"] == 0.25 and both["rewards/echo/std"] == 0.1
    assert "rewards/echo/errors" not in both and "rewards/echo/skipped_frac" not in both
    assert both["learning_rate"] == 1e-3 and both["tempo/nodes"] == 3.0
    trl = rename(m, "trl")
    assert "reward/mean" not in trl and "lr" not in trl and trl["reward"] == 0.5 and trl["tempo/nodes"] == 3.0
    assert rename(m, "rlkit") == m
    assert trl_name("reward/std") is None  # TRL's reward_std is the mean within-group std, not this
    assert rlkit_name("completions/mean_length") == "response_length/mean" and rlkit_name("rewards/x/mean") == "reward/x/mean"


def test_trl_metrics_match_the_completions(tmp_path, echo_rows):
    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 2, "algorithm.entropy_coef": 0.01}))
    tr = Trainer(cfg, train_rows=echo_rows)
    tr.train()
    rows = read_metrics(tr.run_dir)
    with open(os.path.join(tr.run_dir, "completions.jsonl")) as f:
        comps = [json.loads(line) for line in f]
    for r in rows:
        c = [x for x in comps if x["step"] == r["step"]]
        rewards = [x["reward"] for x in c]
        assert r["reward"] == pytest.approx(statistics.fmean(rewards))
        assert r["rewards/echo/mean"] == pytest.approx(statistics.fmean(x["reward/echo"] for x in c))
        assert r["rewards/echo/std"] == pytest.approx(statistics.stdev(x["reward/echo"] for x in c), abs=1e-6)
        groups = {}
        for x in c:
            groups.setdefault(x["group"], []).append(x["reward"])
        assert r["reward_std"] == pytest.approx(statistics.fmean(statistics.stdev(g) for g in groups.values()), abs=1e-6)
        assert r["frac_reward_zero_std"] == pytest.approx(statistics.fmean(len(set(g)) == 1 for g in groups.values()))
        lengths = [x["length"] for x in c]
        assert (r["completions/mean_length"], r["completions/min_length"], r["completions/max_length"]) == \
            pytest.approx((statistics.fmean(lengths), min(lengths), max(lengths)))
        cut = [x["finish_reason"] == "length" for x in c]
        assert r["completions/clipped_ratio"] == pytest.approx(statistics.fmean(cut))
        done = [x["length"] for x in c if x["finish_reason"] != "length"]
        if done:
            assert r["completions/mean_terminated_length"] == pytest.approx(statistics.fmean(done))
        assert r["learning_rate"] == r["lr"] and r["loss"] == r["loss/total"] and "loss/entropy" in r
        assert 0 <= r["clip_ratio/low_mean"] <= r["clip_ratio/region_mean"] + 1e-9
        assert r["epoch"] == pytest.approx(r["step"] * 4 / len(tr.train_rows))
        assert r["prompt_length/min"] <= r["prompt_length/mean"] <= r["prompt_length/max"]
    assert rows[1]["num_tokens"] > rows[0]["num_tokens"] > 0
    assert "reward/echo" not in rows[0]  # no duplicate next to reward/echo/mean
