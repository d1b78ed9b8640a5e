"""UEC-RL entropy-band controller: synthetic entropy traces (hand-computed decisions), wiring, e2e."""
from types import SimpleNamespace

import pytest

from rlkit.algorithms.eframe import EFRameFilter, EFRameRollout
from rlkit.algorithms.uec import UEC
from rlkit.config import ConfigError, load_config
from rlkit.plugins import PluginContext
from tests.conftest import tiny_overrides
from tests.test_eframe import _launch, mean

SIG = "eframe/rollout_entropy"


def fake_trainer(T=1.2, n=20, freq=5):
    strat = EFRameRollout(EFRameRollout.Params(explore_samples=n, explore_temperature=T))
    filt = EFRameFilter(EFRameFilter.Params(train_batch_size=4, replay_freq=freq), PluginContext())
    return SimpleNamespace(strategy=strat, post_filters=[filt])


def run_trace(ctrl, tr, trace):
    out = []
    for H in trace:
        m = ctrl.after_step(tr, {} if H is None else {SIG: H})
        out.append((m["uec/band_state"], round(tr.strategy.params.explore_temperature, 6), tr.strategy.params.explore_samples,
                    tr.post_filters[0].params.replay_freq, m.get("uec/entropy_smoothed")))
    return out


def test_absolute_band_trace_hand_computed():
    p = UEC.Params(entropy_low=1.0, entropy_high=2.0, relative=False, ema=0.5, temp_step=0.1, temp_min=1.0, temp_max=1.4,
                   samples_step=4, samples_min=8, samples_max=24, replay_freq_min=1, replay_freq_max=6, probe_samples=0)
    ctrl, tr = UEC(p), fake_trainer(T=1.2, n=20, freq=5)
    got = run_trace(ctrl, tr, [3.0, 2.6, 1.4, 1.0, None, 0.2, 0.4, 0.1, 0.1, 0.1, 3.0])
    # S_t = 0.5 S_{t-1} + 0.5 H_t (S_1 = H_1); above 2 -> T-0.1, n-4, freq-1; below 1 -> T+0.1, n+4, freq+1; clamped
    expected = [
        (1, 1.1, 16, 4, 3.0),          # S = 3.0 > 2: entropy too high -> cool exploration, replay more often
        (1, 1.0, 12, 3, 2.8),
        (1, 1.0, 8, 2, 2.1),           # T at temp_min
        (0, 1.0, 8, 2, 1.55),          # inside [1, 2]: hold
        (0, 1.0, 8, 2, None),          # no measurement this step: hold, state kept
        (-1, 1.1, 12, 3, 0.875),       # S = 0.5*1.55 + 0.5*0.2 < 1: entropy collapsing -> explore more, replay less
        (-1, 1.2, 16, 4, 0.6375),
        (-1, 1.3, 20, 5, 0.36875),
        (-1, 1.4, 24, 6, 0.234375),    # T at temp_max, n at samples_max, freq at replay_freq_max
        (-1, 1.4, 24, 6, 0.1671875),
        (0, 1.4, 24, 6, 1.58359375),   # back inside the band: hold
    ]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[:4] == e[:4]
        assert (g[4] is None and e[4] is None) or g[4] == pytest.approx(e[4])


def test_relative_band_and_replay_frequency_floor():
    p = UEC.Params(entropy_low=0.5, entropy_high=1.5, relative=True, ema=0.0, temp_step=0.05, probe_samples=0,
                   replay_freq_min=2)
    ctrl, tr = UEC(p), fake_trainer(T=1.2, n=20, freq=3)
    got = run_trace(ctrl, tr, [4.0, 7.0, 6.5, 1.0])
    assert ctrl.band() == (2.0, 6.0)                               # [0.5, 1.5] x S_1 = 4
    assert [g[:4] for g in got] == [(0, 1.2, 20, 3), (1, 1.15, 16, 2), (1, 1.1, 12, 2), (-1, 1.15, 16, 3)]


def test_state_roundtrip_and_metrics():
    p = UEC.Params(entropy_low=1.0, entropy_high=2.0, relative=False, ema=0.5, probe_samples=0)
    a, tr = UEC(p), fake_trainer()
    run_trace(a, tr, [3.0, 2.0])
    b = UEC(p)
    b.load_state_dict(a.state_dict())
    tr2 = fake_trainer(T=tr.strategy.params.explore_temperature, n=tr.strategy.params.explore_samples,
                       freq=tr.post_filters[0].params.replay_freq)
    assert run_trace(a, tr, [1.2]) == run_trace(b, tr2, [1.2])
    m = a.after_step(tr, {SIG: 0.5})
    for k in ("uec/entropy", "uec/entropy_smoothed", "uec/band_low", "uec/band_high", "uec/band_state",
              "uec/explore_temperature", "uec/explore_samples", "uec/replay_freq"):
        assert k in m, k


def test_needs_eframe_machinery(tmp_path):
    with pytest.raises(ConfigError, match="rollout.strategy=eframe"):
        load_config(tiny_overrides(tmp_path) + ["algorithm.controllers=[uec]"])
    with pytest.raises(ValueError, match="entropy_low"):
        UEC.Params(entropy_low=2.0, entropy_high=1.0)


def test_probe_entropy_before_and_after_each_update(tmp_path, echo_rows):
    """In a real run: 'before' is measured on the probe at the weights the update starts from, 'after' on the same
    probe once the update is done; they are logged on update steps only (and per mechanism)."""
    from rlkit.trainer import Trainer

    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 4, "rollout.samples_per_prompt": 5}) + [
        "rollout.strategy={name: eframe, explore_samples: 4}",
        "algorithm.filters=[{name: eframe_filter, train_batch_size: 4, replay_freq: 1, replay_min_abs_adv: 0.5}]",
        "algorithm.controllers=[{name: uec, probe_samples: 8, relative: false, entropy_low: 3.0, entropy_high: 3.5}]"])
    tr = Trainer(cfg, train_rows=echo_rows)
    ctrl = tr.controllers[0]
    prev_probe = None
    for _ in range(4):
        m = tr.step()
        if m["eframe/update"] > 0 and prev_probe is not None:
            assert m["uec/entropy_before_update"] == prev_probe
            assert m["uec/entropy_after_update"] != m["uec/entropy_before_update"]
            if m["eframe/replay_rows"] > 0:
                assert m["uec/entropy_before_replay"] == prev_probe
            if m["eframe/train_explore_rows"] > 0:
                assert "uec/entropy_after_explore" in m
        else:
            assert "uec/entropy_after_update" not in m
        prev_probe = ctrl.probe_entropy
        assert len(ctrl.probe) == 8 and m["uec/entropy"] == m[SIG]


def test_uec_end_to_end_tiny(tmp_path):
    m, run = _launch("uec", tmp_path)
    assert any(r["eframe/update"] > 0 for r in m)
    assert all("uec/entropy" in r and "uec/explore_temperature" in r for r in m)
    for k in ("uec/entropy_before_replay", "uec/entropy_after_replay", "uec/entropy_before_explore",
              "uec/entropy_after_explore", "uec/entropy_before_update", "uec/entropy_after_update"):
        assert any(k in r for r in m), k
    assert len({r["uec/explore_temperature"] for r in m}) > 1          # the controller acted
    r = [x["eframe/main_reward_mean"] for x in m]
    assert mean(r[-4:]) > mean(r[:4]), r
