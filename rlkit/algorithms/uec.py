"""UEC-RL: targeted exploration with unified entropy control, as an entropy-band controller on EFRame.

Paper: Wang et al. 2026, "Targeted Exploration via Unified Entropy Control for
Reinforcement Learning", arXiv 2604.14646 (ACL Findings 2026).  The UEC-RL code
could not be read; the same authors' EFRame repository, renamed for UEC-RL days
before the paper, has no explicit entropy controller (specs/confirmations.md Sec. 4).
The paper summaries describe (a) exploration on difficult prompts with an
adaptive exploration temperature and (b) a stabiliser that replays
high-advantage trajectories so entropy stays in a range.  This module makes that
explicit [INFERRED design, documented in docs/methods/uec.md]:

* the machinery is EFRame's (``rollout.strategy: eframe`` explores hard prompts,
  ``eframe_filter`` filters and replays |A| > 1 rows);
* ``controller: uec`` keeps the policy entropy inside a band [low, high]:

  - signal ``H_t`` = ``eframe/rollout_entropy`` (-mean log-prob of the step's main-round
    sampled tokens: a Monte-Carlo estimate of the policy's token entropy at the
    rollout temperature, free and identical on every rank), smoothed
    ``S_t = ema * S_{t-1} + (1 - ema) * H_t`` (``S_1 = H_1``);
  - ``S_t > high`` (entropy too high, the exploration is destabilising): exploration
    temperature ``T -= temp_step`` (>= ``temp_min``), extra samples ``n -= samples_step``
    (>= ``samples_min``), replay more often ``replay_freq -= 1`` (>= ``replay_freq_min``);
  - ``S_t < low`` (entropy collapsing): ``T += temp_step`` (<= ``temp_max``),
    ``n += samples_step`` (<= ``samples_max``), replay less often ``replay_freq += 1``
    (<= ``replay_freq_max``);
  - inside the band: hold.  The new values act from the next step on.
  With ``relative: true`` the band is ``[low * S_1, high * S_1]``.

* to show that it controls entropy, the exact mean token entropy of the policy
  (full softmax at the rollout temperature) is measured on a fixed probe of
  ``probe_samples`` main-round rows before and after each update: the probe is
  chosen and measured at the end of step t-1 (= the weights step t starts from)
  and measured again at the end of step t.  Logged as
  ``uec/entropy_before_update`` / ``uec/entropy_after_update`` on every step with an
  update, and as ``uec/entropy_{before,after}_replay`` on steps whose update mixed
  in replayed rows and ``uec/entropy_{before,after}_explore`` on steps whose update
  contained exploration rows (step-level attribution: both may be in one update).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

from ..batch import Batch
from ..plugins import Controller
from ..registry import register_controller
from .eframe import EFRameFilter, EFRameRollout, _batch_from_state, _batch_to_state


@register_controller("uec")
class UEC(Controller):
    """Entropy-band controller over EFRame's exploration temperature / samples and replay frequency."""

    @dataclass
    class Params:
        entropy_low: float = 0.7
        entropy_high: float = 1.3
        relative: bool = True               # band = [low, high] x the first smoothed entropy
        ema: float = 0.5                    # smoothing of the entropy signal (0 = none)
        temp_step: float = 0.05
        temp_min: float = 1.0
        temp_max: float = 1.5
        samples_step: int = 4
        samples_min: int = 8
        samples_max: int = 32
        replay_freq_min: int = 1
        replay_freq_max: int = 10
        probe_samples: int = 32             # main-round rows of the entropy probe (0 = no before/after probe)
        signal: Literal["eframe/rollout_entropy", "entropy/mean"] = "eframe/rollout_entropy"

        def __post_init__(self):
            if not self.entropy_low < self.entropy_high:
                raise ValueError(f"uec: entropy_low ({self.entropy_low}) must be < entropy_high ({self.entropy_high})")
            if not 0.0 <= self.ema < 1.0:
                raise ValueError(f"uec: ema must be in [0, 1), got {self.ema}")
            if not 0 < self.temp_min <= self.temp_max:
                raise ValueError(f"uec: need 0 < temp_min <= temp_max, got {self.temp_min}, {self.temp_max}")
            if not 0 <= self.samples_min <= self.samples_max:
                raise ValueError(f"uec: need 0 <= samples_min <= samples_max, got {self.samples_min}, {self.samples_max}")
            if not 1 <= self.replay_freq_min <= self.replay_freq_max:
                raise ValueError(f"uec: need 1 <= replay_freq_min <= replay_freq_max, got {self.replay_freq_min}, {self.replay_freq_max}")
            if self.temp_step < 0 or self.samples_step < 0 or self.probe_samples < 0:
                raise ValueError("uec: temp_step, samples_step and probe_samples must be >= 0")

    @staticmethod
    def check_config(cfg, params, key) -> None:
        from ..config import ConfigError

        strat = getattr(cfg.rollout.strategy, "name", None)
        filters = [s.name for s in cfg.algorithm.filters]
        if strat != "eframe" or "eframe_filter" not in filters:
            raise ConfigError(f"{key}: the uec controller drives EFRame's exploration and replay; it needs "
                              f"rollout.strategy=eframe and an eframe_filter in algorithm.filters "
                              f"(got strategy {strat!r}, filters {filters})")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.smoothed: Optional[float] = None
        self.scale: Optional[float] = None          # S_1 when relative
        self.band_state = 0
        self.probe: Optional[Batch] = None
        self.probe_entropy: Optional[float] = None  # probe entropy at the weights the next update starts from

    # ------------------------------------------------------------ the law
    def band(self):
        p = self.params
        s = self.scale if (p.relative and self.scale is not None) else 1.0
        return p.entropy_low * s, p.entropy_high * s

    def decide(self, H: float, temperature: float, samples: int, replay_freq: int):
        """One control step on a new entropy measurement ``H``; returns (state, T, n, replay_freq)
        with state +1 (above the band), -1 (below) or 0 (inside, hold)."""
        p = self.params
        self.smoothed = H if self.smoothed is None else p.ema * self.smoothed + (1.0 - p.ema) * H
        if self.scale is None:
            self.scale = self.smoothed
        low, high = self.band()
        if self.smoothed > high:
            return (1, max(p.temp_min, temperature - p.temp_step), max(p.samples_min, samples - p.samples_step),
                    max(p.replay_freq_min, replay_freq - 1))
        if self.smoothed < low:
            return (-1, min(p.temp_max, temperature + p.temp_step), min(p.samples_max, samples + p.samples_step),
                    min(p.replay_freq_max, replay_freq + 1))
        return 0, temperature, samples, replay_freq

    # ------------------------------------------------------------ the hook
    @staticmethod
    def _parts(trainer):
        strat = trainer.strategy
        filt = next((f for f in getattr(trainer, "post_filters", []) if isinstance(f, EFRameFilter)), None)
        if not isinstance(strat, EFRameRollout) or filt is None:
            raise RuntimeError("uec: needs rollout.strategy=eframe and an eframe_filter")
        return strat, filt

    def after_step(self, trainer: Any, metrics: Dict[str, float]) -> Dict[str, float]:
        p = self.params
        strat, filt = self._parts(trainer)
        out: Dict[str, float] = {}
        if p.probe_samples > 0:
            out.update(self._probe_step(trainer, strat, metrics))
        H = metrics.get(p.signal)
        if H is not None:
            sp = strat.params
            state, T, n, f = self.decide(float(H), sp.explore_temperature, sp.explore_samples, filt.params.replay_freq)
            self.band_state = state
            sp.explore_temperature, sp.explore_samples, filt.params.replay_freq = float(T), int(n), int(f)
            low, high = self.band()
            out.update({"uec/entropy": float(H), "uec/entropy_smoothed": float(self.smoothed), "uec/band_low": low,
                        "uec/band_high": high})
        out.update({"uec/band_state": float(self.band_state), "uec/explore_temperature": strat.params.explore_temperature,
                    "uec/explore_samples": float(strat.params.explore_samples), "uec/replay_freq": float(filt.params.replay_freq)})
        return out

    # ------------------------------------------------------------ the probe
    def _probe_step(self, trainer, strat: EFRameRollout, metrics: Dict[str, float]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        updated = metrics.get("eframe/update", 0.0) > 0
        if self.probe is not None and self.probe_entropy is not None and updated:
            before, after = self.probe_entropy, self.entropy_of(trainer, self.probe)
            out["uec/entropy_before_update"], out["uec/entropy_after_update"] = before, after
            if metrics.get("eframe/replay_rows", 0.0) > 0:
                out["uec/entropy_before_replay"], out["uec/entropy_after_replay"] = before, after
            if metrics.get("eframe/train_explore_rows", 0.0) > 0:
                out["uec/entropy_before_explore"], out["uec/entropy_after_explore"] = before, after
        main = strat.last_main
        if main is not None and len(main):
            self.probe = main.select(range(min(self.params.probe_samples, len(main))))
            self.probe_entropy = self.entropy_of(trainer, self.probe)   # = "before" for the next step's update
        return out

    @staticmethod
    def entropy_of(trainer, batch: Batch) -> float:
        """Mean token entropy of the current policy (full softmax, at the rollout log-prob temperature) on
        ``batch``'s responses, averaged over all ranks' probes."""
        tot, cnt = 0.0, 0.0
        for ids in trainer._microbatches(batch):
            mb = batch.select(ids)
            (_, ent, _), _ = trainer._forward(trainer.policy, mb, need_entropy=True, grad=False)
            m = mb.response_mask.to(ent.device)
            tot += float((ent * m).sum())
            cnt += float(m.sum())
        if getattr(trainer, "world", 1) > 1:
            tot, cnt = trainer._sum(tot), trainer._sum(cnt)
        return tot / max(cnt, 1.0)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {"smoothed": self.smoothed, "scale": self.scale, "band_state": self.band_state,
                "probe": _batch_to_state(self.probe), "probe_entropy": self.probe_entropy}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.smoothed, self.scale = state["smoothed"], state["scale"]
        self.band_state = int(state["band_state"])
        self.probe = _batch_from_state(state["probe"])
        self.probe_entropy = state["probe_entropy"]
