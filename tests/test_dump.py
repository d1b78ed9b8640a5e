"""DUMP prompt selector (rlkit/algorithms/dump.py): UCB math, windows, sampling, determinism, resume, ranks."""
import json
import os
from collections import Counter

import pytest
import torch

from rlkit.algorithms.dump import DUMPSelector, per_response_advantage, softmax_weights, ucb_scores
from rlkit.batch import Batch
from rlkit.plugins import PluginContext
from tests.conftest import launch_recipe


def make(rows, seed=0, world_size=1, rank=0, **params):
    sel = DUMPSelector(DUMPSelector.Params(**params), PluginContext(seed=seed, world_size=world_size, rank=rank))
    sel.bind(rows)
    return sel


def source_rows(sizes):
    """{"a": 3, "b": 2} -> rows with a `data_source` column, sources interleaved."""
    rows = []
    for s, n in sizes.items():
        rows += [{"prompt": f"{s}{i}", "data_source": s} for i in range(n)]
    return rows


def test_spec_worked_example():
    # sources (n=100, mu=0.6) and (n=20, mu=0.3): UCB 0.9082, 0.9758 -> weights 0.337 / 0.663
    u = ucb_scores([0.6, 0.3], [100, 20])
    assert u == pytest.approx([0.9082, 0.9758], abs=1e-4)
    assert softmax_weights(u, 0.1) == pytest.approx([0.337, 0.663], abs=1e-3)
    # the same through the selector's windows and counts
    sel = make(source_rows({"a": 5, "b": 5}))
    sel.record([("a", 0.6)] * 100 + [("b", 0.3)] * 20)
    assert sel.counts == {"a": 100, "b": 20}
    assert sel.mean_abs_adv() == pytest.approx([0.6, 0.3])
    assert sel.weights() == pytest.approx([0.337, 0.663], abs=1e-3)


def test_uniform_before_any_update_and_exploration_bonus():
    sel = make(source_rows({"a": 3, "b": 3, "c": 3}))
    assert sel.weights() == pytest.approx([1 / 3] * 3)
    sel.record([("a", 0.0)] * 50)          # a seen a lot with no signal: b and c get the exploration bonus
    w = sel.weights()
    assert w[1] == pytest.approx(w[2]) and w[0] < 1e-3


def test_window_keeps_the_last_n_and_counts_everything():
    sel = make(source_rows({"a": 2, "b": 2}), window=3)
    sel.record([("a", 1.0)] * 3)
    assert sel.mean_abs_adv()[0] == pytest.approx(1.0)
    sel.record([("a", 0.0)] * 2)
    assert sel.mean_abs_adv()[0] == pytest.approx(1 / 3)   # window [1, 0, 0]
    sel.record([("a", 0.0)])
    assert sel.mean_abs_adv()[0] == 0.0 and sel.counts["a"] == 6   # n_j is not windowed
    sel.record([("zzz", 5.0)])                                       # an unknown source is ignored
    assert "zzz" not in sel.counts


def test_after_advantage_records_abs_mean_token_advantage_per_response():
    adv = torch.tensor([[0.5, 0.5, 9.0], [-1.0, -3.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    b = Batch(prompt_ids=[[1]] * 3, response_ids=torch.zeros(3, 3, dtype=torch.long), response_mask=mask,
              group_ids=torch.zeros(3, dtype=torch.long), advantages=adv, info={"data_source": ["a", "b", "a"]})
    per = per_response_advantage(b)
    assert per[:2].tolist() == [0.5, -2.0] and torch.isnan(per[2])     # padding never counts; empty rows skipped
    sel = make(source_rows({"a": 2, "b": 2}))
    assert sel.after_advantage(b) == {}
    assert sel.counts == {"a": 0, "b": 0}          # recorded only at update(), which every rank calls
    m = sel.update(b)
    assert sel.counts == {"a": 1, "b": 1} and list(sel.windows["b"]) == [2.0]
    assert m["dump/records"] == 2 and m["dump/mean_abs_adv/a"] == 0.5 and m["dump/count/b"] == 1
    assert sum(m[f"dump/weight/{s}"] for s in "ab") == pytest.approx(1.0)


def test_selection_follows_weights_and_draws_within_the_source():
    rows = source_rows({"a": 4, "b": 10, "c": 1})
    sel = make(rows, temperature=0.1)
    sel.record([("a", 0.9)] * 300 + [("b", 0.4)] * 300 + [("c", 0.5)] * 300)
    w = dict(zip(sel.sources, sel.weights()))
    idx = sel.select(1, 4000)
    got = Counter(rows[i]["data_source"] for i in idx)
    for s in "abc":
        assert got[s] / 4000 == pytest.approx(w[s], abs=0.03)
    assert {rows[i]["prompt"] for i in idx if rows[i]["data_source"] == "a"} == {f"a{i}" for i in range(4)}  # uniform within


def test_deterministic_resumable_and_identical_on_every_rank():
    rows = source_rows({"a": 7, "b": 5, "c": 3})
    recs = [("a", 0.2), ("b", 0.9), ("c", 0.4)] * 10
    r0, r1 = make(rows, seed=3, world_size=2, rank=0), make(rows, seed=3, world_size=2, rank=1)
    assert r0.select(1, 16) == r1.select(1, 16)     # both ranks draw the same prompts (and take their own slice)
    a = make(rows, seed=3)
    first = a.select(1, 8)
    a.record(recs)
    state = a.state_dict()
    cont = [a.select(s, 8) for s in (2, 3)]
    b = make(rows, seed=3)
    b.load_state_dict(state)
    assert [b.select(s, 8) for s in (2, 3)] == cont
    c = make(rows, seed=3)
    assert c.select(1, 8) == first                  # same seed, same first draw
    assert make(rows, seed=4).select(1, 64) != make(rows, seed=3).select(1, 64)


def test_update_gathers_every_ranks_records(monkeypatch):
    import accelerate.utils

    rows = source_rows({"a": 3, "b": 3})
    r0, r1 = make(rows, world_size=2, rank=0), make(rows, world_size=2, rank=1)
    r0._pending, r1._pending = [("a", 0.5)], [("b", 0.1), ("b", 0.3)]
    both = [list(r0._pending), list(r1._pending)]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: both)   # what all_gather returns on each rank
    m0, m1 = r0.update(None), r1.update(None)
    assert m0 == m1 and r0.state_dict()["windows"] == r1.state_dict()["windows"] == {"a": [0.5], "b": [0.1, 0.3]}


def test_bind_names_the_missing_column():
    with pytest.raises(ValueError, match=r"row 1 has no source column 'level'"):
        make([{"prompt": "x", "level": "1"}, {"prompt": "y"}], source_field="level")
    with pytest.raises(ValueError, match="window"):
        DUMPSelector.Params(window=0)


def test_trainer_resume_restores_the_curriculum(tmp_path):
    """In-process: the selector sees advantages through the trainer's after_advantage hook, and a resumed run
    continues with the same windows, counts and prompt draws."""
    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer
    from tests.conftest import tiny_overrides

    rows = [dict(r, level=f"L{len(r['question']) % 3}") for r in echo_rows(64, seed=1)]
    over = ["algorithm.prompt_selector={name: dump, source_field: level}"]

    def make_trainer(d, **kw):
        return Trainer(load_config(tiny_overrides(d, **kw) + over), train_rows=rows)

    a = make_trainer(tmp_path / "a", **{"trainer.total_steps": 3})
    a.train()
    b = make_trainer(tmp_path / "b", **{"trainer.total_steps": 3})
    b.step(); b.step()
    b.save_checkpoint()
    c = make_trainer(tmp_path / "b", **{"trainer.total_steps": 3, "trainer.resume": "auto"})
    assert c.selector.state_dict()["counts"] == b.selector.state_dict()["counts"]
    assert sum(c.selector.counts.values()) == 2 * 4 * 4       # 2 steps x 4 prompts x 4 samples, all recorded
    c.train()
    sa, sc = a.selector.state_dict(), c.selector.state_dict()
    assert sa["windows"] == sc["windows"] and sa["counts"] == sc["counts"] and torch.equal(sa["rng"], sc["rng"])
    m = [json.loads(line) for line in open(os.path.join(c.run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in m] == [1, 2, 3] and all("dump/weight/L0" in r for r in m)


def test_tiny_recipe_end_to_end(tmp_path):
    """As users launch it: python launch/train.py recipe=recipes/dump_math.yaml profile=tiny."""
    m, _ = launch_recipe("dump_math", tmp_path, "trainer.save_final=false")
    assert [r["step"] for r in m] == list(range(1, 13))
    for r in m:
        w = [r[f"dump/weight/{s}"] for s in ("short", "medium", "long")]
        assert sum(w) == pytest.approx(1.0) and r["dump/records"] == 16 * 8
    assert m[-1]["dump/count/short"] + m[-1]["dump/count/medium"] + m[-1]["dump/count/long"] == 12 * 16 * 8
    assert m[-1]["reward/mean"] > 0


def test_weights_move_towards_the_source_with_signal(tmp_path):
    """Trainer-level mechanism test (issue 10): one source always scores 0 (|advantage| 0), the other has spread;
    after training, DUMP's weights and its prompt draws favour the source with signal.  Catches the source weights
    held uniform (docs/methods/dump.md)."""
    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer
    from tests.conftest import REPO, read_metrics, tiny_overrides

    rows = [dict(r, level="dead" if i % 2 else "live") for i, r in enumerate(echo_rows(64, seed=1))]
    reward = "[" + str(REPO / "tests" / "mechanism_rewards.py") + ":first_early]"
    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 3, "reward.functions": reward})
                      + ["algorithm.prompt_selector={name: dump, source_field: level}"])
    tr = Trainer(cfg, train_rows=rows)
    tr.train()
    m = read_metrics(tr.run_dir)
    sel = tr.selector
    assert sel.mean_abs_adv()[sel.sources.index("dead")] == 0.0 < sel.mean_abs_adv()[sel.sources.index("live")]
    # the weights logged after each update (for the next step's draws): uniform only before any signal
    w = [(r["dump/weight/live"], r["dump/weight/dead"]) for r in m if r["dump/mean_abs_adv/live"] > 0]
    assert len(w) >= 2 and all(a > b for a, b in w), w
    picks = sel.select(len(m) + 1, 2000)      # the next draws of the trained curriculum (seeded: deterministic)
    live = sum(rows[i]["level"] == "live" for i in picks)
    assert live / len(picks) > 0.54, (live, w)
