"""Run reports (rlkit/report.py): PNGs and a self-contained HTML page for one run or a comparison."""
import json
import os
import re

import pytest

from rlkit.report import main, pick_steps, read_metrics, run_labels, sample_completions, write_report

EVIL = "<script>alert('x')</script>"


def synthetic_run(d, steps=20, reward_shift=0.0, evil=True):
    """A run directory as the trainer writes it: metrics.jsonl, completions.jsonl, config.yaml, a checkpoint eval."""
    os.makedirs(d / "checkpoints" / f"step_{steps}" / "model", exist_ok=True)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            m = {"step": s, "reward/mean": 0.1 + 0.02 * s + reward_shift, "accuracy": 0.01 * s, "entropy/mean": 1.0 / s,
                 "response_length/mean": 100.0 - s, "kl/mean": 0.001 * s, "clipfrac/mean": 0.05,
                 "logprob_gap/mean": 1e-6, "logprob_gap/max": 1e-5, "time/rollout": 1.0, "time/train": 0.5,
                 "time/step": 2.0, "throughput/tokens_per_s": 1000.0, "dump/weight/Level 1": 0.25,
                 "dump/weight/Level 2": 0.75, "length_budget/budget": 256 if s < 10 else 179}
            if s % 10 == 0:
                m.update({"eval/strict/pass@1": 0.4567 + 0.1 * (s // 10 - 1), "eval/flexible/pass@1": 0.5,
                          "eval/by_level/Level 1/strict/pass@1": 0.9, "eval/num_prompts": 500.0})
            f.write(json.dumps(m) + "\n")
    with open(d / "completions.jsonl", "w") as f:
        for s in range(1, steps + 1):
            for i in range(4):
                row = {"step": s, "group": i // 2, "prompt": f"Q{s} & <b>bold</b>", "completion": f"c{s}-{i}",
                       "reward": float(i == 2) + 0.1 * i, "answer": "42", "finish_reason": "stop", "length": 10 + i,
                       "advantage": 0.5 - i * 0.25}
                if evil and i == 3:
                    row["completion"] = EVIL
                f.write(json.dumps(row) + "\n")
    (d / "config.yaml").write_text(f"model:\n  name_or_path: toy:tiny\nnote: \"{EVIL}\"\ntrainer:\n  lr: 0.01\n")
    (d / "checkpoints" / f"step_{steps}" / "model" / "eval_math500.json").write_text(
        json.dumps({"strict/pass@1": 0.7321, "flexible/pass@1": 0.75, "num_prompts": 500.0}))
    return d


def test_single_run_report(tmp_path):
    run = synthetic_run(tmp_path / "myrun")
    path = main([str(run), "--completion-steps", "4"])
    out = run / "report"
    assert path == str(out / "index.html")
    for png in ("reward", "evaluation", "entropy", "response_length", "KL", "clip_fraction", "log_prob_gap",
                "time_per_stage", "curriculum_source_weights", "curriculum_length_budget"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
    page = (out / "index.html").read_text()
    for section in ("id='summary'", "id='plots'", "id='eval'", "id='completions'", "id='config'"):
        assert section in page
    # self-contained: every image inline, nothing fetched
    assert page.count("src='data:image/png;base64,") == len(list(out.glob("*.png"))) == 10
    assert not re.search(r"(src|href)=['\"]?(https?:|//|[\w./-]+\.(png|css|js))", page)
    # escaping: run content never becomes markup
    assert "<script" not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # markupsafe's escaping
    assert "<b>bold</b>" not in page and "Q20 &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    # eval table: in-training eval/* (metric x step) and the checkpoint's eval_math500.json
    assert "step 10" in page and "0.4567" in page and "0.5567" in page and "by_level/Level 1/strict/pass@1" in page
    assert "step 20: math500" in page and "0.7321" in page
    # summary: last-10% reward (steps 19, 20: 0.48, 0.50) and the best eval with its step
    assert "<td>0.49</td>" in page and "0.5567 @ 20" in page
    # completions: 4 steps (first, last, evenly spread), best / worst / random of each
    assert [int(s) for s in re.findall(r"<h3>step (\d+)</h3>", page)] == [1, 7, 14, 20]
    assert page.count("<td>best</td>") == page.count("<td>worst</td>") == page.count("<td>random</td>") == 4
    assert "<pre>c20-2</pre>" in page                          # the best of step 20 (reward 1.2)
    assert "toy:tiny" in page and "lr: 0.01" in page           # the config


def test_comparison_overlays_runs(tmp_path):
    a = synthetic_run(tmp_path / "x" / "grpo")
    b = synthetic_run(tmp_path / "y" / "dump", reward_shift=0.3, evil=False)
    c = synthetic_run(tmp_path / "z" / "grpo", steps=10)
    assert run_labels([str(a), str(b)]) == ["grpo", "dump"]
    assert run_labels([str(a), str(c)]) == [os.path.normpath(str(a)), os.path.normpath(str(c))]   # same name: paths
    out = tmp_path / "cmp"
    main([str(a), str(b), "--out", str(out)])
    page = (out / "index.html").read_text()
    assert "rlkit comparison: grpo vs dump" in page
    summary = page.split("id='summary'")[1].split("<h2")[0]
    assert summary.count("<tr>") == 3 and "<td>grpo</td>" in summary and "<td>dump</td>" in summary
    assert "<td>0.79</td>" in summary                          # dump's last-10% reward (0.49 + 0.3)
    assert page.count("<details open><summary>grpo</summary>") == 3   # eval, completions, config per run
    assert (out / "reward.png").exists() and "<script" not in page


def test_pick_steps_and_streaming_samples(tmp_path):
    assert pick_steps(range(1, 101), 5) == [1, 26, 51, 75, 100]
    assert pick_steps([3, 1, 2], 8) == [1, 2, 3] and pick_steps([1, 2], 0) == [] and pick_steps([4, 9], 1) == [9]
    run = synthetic_run(tmp_path / "r", steps=6)
    path = str(run / "completions.jsonl")
    got = sample_completions(path, [2, 5], seed=1)
    assert sorted(got) == [2, 5]
    assert got[2]["best"]["completion"] == "c2-2" and got[2]["worst"]["completion"] == "c2-0"
    assert got == sample_completions(path, [2, 5], seed=1)      # reproducible random picks
    picks = {sample_completions(path, [5], seed=s)[5]["random"]["completion"] for s in range(30)}
    assert len(picks) > 1                                        # ... that do vary with the seed
    assert sample_completions(str(tmp_path / "missing.jsonl"), [1]) == {}
    with open(run / "metrics.jsonl", "a") as f:           # a live run's half-written last line is skipped
        f.write('{"step": 7, "reward/me')
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3, 4, 5, 6]


def test_report_of_a_real_tiny_run(tmp_path, echo_rows):
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import tiny_overrides

    tr = Trainer(load_config(tiny_overrides(tmp_path)), train_rows=echo_rows)
    tr.train()
    written = write_report([tr.run_dir], os.path.join(tr.run_dir, "report"), completion_steps=2)
    page = open(written["html"]).read()
    assert {os.path.basename(p) for p in written["plots"]} >= {"reward.png", "entropy.png", "time_per_stage.png"}
    assert [int(s) for s in re.findall(r"<h3>step (\d+)</h3>", page)] == [1, 3]
    assert "prompts_per_step: 4" in page and "<td>best</td>" in page
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main([str(tmp_path / "nope")])


def test_report_fixes_issue13(tmp_path):
    """Per-function reward curves, TRL-named runs, config differences, smoothing, best = worst rows."""
    from rlkit.report import config_diff, smooth

    assert smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])  # debiased EMA: (0.5*0.5 + 0) / (1 - 0.25)
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    a = synthetic_run(tmp_path / "a", steps=4, evil=False)
    b = synthetic_run(tmp_path / "b", steps=4, evil=False)
    (b / "config.yaml").write_text("model:\n  name_or_path: toy:tiny\ntrainer:\n  lr: 0.02\n  seed: 3\n")
    assert config_diff([str(a), str(b)]) == [("note", [EVIL, "(absent)"]), ("trainer.lr", [0.01, 0.02]),
                                             ("trainer.seed", ["(absent)", 3])]
    # a run logged with TRL's names only (trainer.metric_names=trl), with per-function rewards
    rows = [json.loads(line) for line in open(b / "metrics.jsonl")]
    with open(b / "metrics.jsonl", "w") as f:
        for r in rows:
            r["reward"] = r.pop("reward/mean")
            r["rewards/gsm8k/mean"] = 0.5
            f.write(json.dumps(r) + "\n")
    # every completion of step 4 in run a has the same reward
    comps = [json.loads(line) for line in open(a / "completions.jsonl")]
    with open(a / "completions.jsonl", "w") as f:
        for c in comps:
            c["reward"] = 1.0 if c["step"] == 4 else c["reward"]
            f.write(json.dumps(c) + "\n")
    out = write_report([str(a), str(b)], str(tmp_path / "cmp"), completion_steps=2, smoothing=0.6)
    names = {os.path.basename(p) for p in out["plots"]}
    assert "reward_per_function.png" in names and "reward.png" in names
    page = open(out["html"]).read()
    assert "Config differences" in page and "trainer.seed" in page
    assert page.count("best = worst (every reward 1)") == 1
    from rlkit.report import series
    assert series(read_metrics(str(b)), "reward/mean")[1][0] == pytest.approx(0.12)  # read by TRL's name

