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
  - fourth knob, off unless ``entropy_coef_step`` > 0 (added for issue 10, [INFERRED]: "unified entropy
    control" read as an entropy regulariser the controller owns, like Skywork-OR1's adaptive entropy control,
    arXiv 2505.22312): the trainer's entropy bonus ``-entropy_coef x H`` (``algorithm.entropy_coef``),
    ``+entropy_coef_step`` below the band, ``-entropy_coef_step`` above it, clamped to
    ``[entropy_coef_min, entropy_coef_max]``; ``entropy_coef_gain`` > 0 replaces the steps by a proportional law
    ``gain * (mid - S_t) / mid`` (mid = band centre).  With ``keep_zero_adv_below`` the filter also trains
    zero-advantage rows while ``S_t < low`` (``eframe_filter.min_abs_adv`` -> -1), so the bonus reaches a policy
    whose groups all have equal rewards; the three EFRame knobs have no authority there (no hard prompts, no
    surviving rows).  Measured on stories260K in docs/methods/uec.md.

* to show that it controls entropy, the exact mean token entropy of the policy (full softmax at the rollout
  temperature) is measured on a fixed probe of ``probe_samples`` main-round rows: the probe is chosen and measured
  at the end of step t-1 (= the weights theta_0 step t starts from) and measured again after step t's update
  (``uec/entropy_before_update`` / ``uec/entropy_after_update``).  Per mechanism (``probe_mechanisms``), right
  before the real update the trainer's own update is run on the *replayed rows alone* and on the *exploration
  rows alone*, each from theta_0 with the same optimizer state and RNG, the probe is measured, and weights,
  optimizer state and RNG are restored: ``uec/entropy_after_replay`` / ``uec/entropy_after_explore`` are the
  probe entropies after those isolated updates, ``uec/entropy_before_{replay,explore}`` = the theta_0 value
  (every update starts there), ``uec/entropy_delta_{replay,explore}`` their difference.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch

from ..batch import Batch
from ..plugins import Controller
from ..registry import register_controller
from .eframe import EFRameFilter, EFRameRollout, _batch_from_state, _batch_to_state

log = logging.getLogger(__name__)
MECHANISMS = ("replay", "explore")


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
        # entropy-regularisation knob [INFERRED]: algorithm.entropy_coef (the trainer's bonus -coef x entropy) moves
        # by +step below the band, -step above it, clamped to [min, max]; entropy_coef_step 0 = knob off
        entropy_coef_step: float = 0.0
        entropy_coef_min: float = 0.0
        entropy_coef_max: float = 0.0
        entropy_coef_gain: float = 0.0      # > 0: proportional law instead of steps (the knob still needs entropy_coef_step > 0)
        # below the band, eframe_filter also keeps zero-advantage rows (min_abs_adv -> -1) so the entropy bonus
        # reaches a collapsed policy whose groups all have equal rewards [INFERRED]; restored otherwise
        keep_zero_adv_below: bool = False
        probe_samples: int = 32             # main-round rows of the entropy probe (0 = no before/after probe)
        probe_mechanisms: bool = True       # also: probe entropy after an isolated update on replay / explore rows
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
            if self.temp_step < 0 or self.samples_step < 0 or self.probe_samples < 0 or self.entropy_coef_step < 0:
                raise ValueError("uec: temp_step, samples_step, entropy_coef_step and probe_samples must be >= 0")
            if self.entropy_coef_step > 0 and not 0 <= self.entropy_coef_min <= self.entropy_coef_max:
                raise ValueError(f"uec: need 0 <= entropy_coef_min <= entropy_coef_max, got {self.entropy_coef_min}, "
                                 f"{self.entropy_coef_max}")

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
        self.coef: Optional[float] = None           # the entropy-coefficient knob (entropy_coef_step > 0)
        self._min_abs_adv: Optional[float] = None   # eframe_filter's own value (keep_zero_adv_below)
        self.probe: Optional[Batch] = None
        self.probe_entropy: Optional[float] = None  # probe entropy at the weights the next update starts from
        self._mech: Dict[str, float] = {}           # probe entropy after an isolated update per mechanism

    # ------------------------------------------------------------ the law
    def band(self):
        p = self.params
        s = self.scale if (p.relative and self.scale is not None) else 1.0
        return p.entropy_low * s, p.entropy_high * s

    def decide(self, H: float, temperature: float, samples: int, replay_freq: int, coef: float = 0.0):
        """One control step on a new entropy measurement ``H``; returns (state, T, n, replay_freq, entropy_coef)
        with state +1 (above the band), -1 (below) or 0 (inside, hold).  ``entropy_coef`` moves only when
        ``entropy_coef_step`` > 0."""
        p = self.params
        self.smoothed = H if self.smoothed is None else p.ema * self.smoothed + (1.0 - p.ema) * H
        if self.scale is None:
            self.scale = self.smoothed
        low, high = self.band()
        if p.entropy_coef_step > 0 and p.entropy_coef_gain > 0:   # proportional: coef from the distance below mid-band
            mid = 0.5 * (low + high)
            coef = min(p.entropy_coef_max, max(p.entropy_coef_min, p.entropy_coef_gain * (mid - self.smoothed) / mid))
        if self.smoothed > high:
            if p.entropy_coef_step > 0 and not p.entropy_coef_gain > 0:
                coef = max(p.entropy_coef_min, coef - p.entropy_coef_step)
            return (1, max(p.temp_min, temperature - p.temp_step), max(p.samples_min, samples - p.samples_step),
                    max(p.replay_freq_min, replay_freq - 1), coef)
        if self.smoothed < low:
            if p.entropy_coef_step > 0 and not p.entropy_coef_gain > 0:
                coef = min(p.entropy_coef_max, coef + p.entropy_coef_step)
            return (-1, min(p.temp_max, temperature + p.temp_step), min(p.samples_max, samples + p.samples_step),
                    min(p.replay_freq_max, replay_freq + 1), coef)
        return 0, temperature, samples, replay_freq, coef

    # ------------------------------------------------------------ the hook
    @staticmethod
    def _parts(trainer):
        strat = trainer.strategy
        filt = next((f for f in getattr(trainer, "post_filters", []) if isinstance(f, EFRameFilter)), None)
        if not isinstance(strat, EFRameRollout) or filt is None:
            raise RuntimeError("uec: needs rollout.strategy=eframe and an eframe_filter")
        return strat, filt

    def _coef(self, trainer) -> float:
        """The entropy-coefficient knob: ``algorithm.entropy_coef`` (clamped to the knob's range on first use)."""
        p = self.params
        if self.coef is None:
            self.coef = min(p.entropy_coef_max, max(p.entropy_coef_min, float(trainer.cfg.algorithm.entropy_coef)))
        return self.coef

    def before_step(self, trainer: Any) -> None:
        # the trainer reads algorithm.entropy_coef in every loss; set it from the controller's state (also after a resume)
        if self.params.entropy_coef_step > 0:
            trainer.cfg.algorithm.entropy_coef = self._coef(trainer)

    def after_step(self, trainer: Any, metrics: Dict[str, float]) -> Dict[str, float]:
        p = self.params
        strat, filt = self._parts(trainer)
        out: Dict[str, float] = {}
        if p.probe_samples > 0:
            out.update(self._probe_step(trainer, strat, metrics))
        knob = p.entropy_coef_step > 0
        H = metrics.get(p.signal)
        if H is not None:
            sp = strat.params
            state, T, n, f, c = self.decide(float(H), sp.explore_temperature, sp.explore_samples, filt.params.replay_freq,
                                            self._coef(trainer) if knob else 0.0)
            self.band_state = state
            sp.explore_temperature, sp.explore_samples, filt.params.replay_freq = float(T), int(n), int(f)
            if knob:
                self.coef = trainer.cfg.algorithm.entropy_coef = float(c)
            if p.keep_zero_adv_below:
                if self._min_abs_adv is None:
                    self._min_abs_adv = filt.params.min_abs_adv
                filt.params.min_abs_adv = -1.0 if state < 0 else self._min_abs_adv
            low, high = self.band()
            out.update({"uec/entropy": float(H), "uec/entropy_smoothed": float(self.smoothed), "uec/band_low": low,
                        "uec/band_high": high})
        out.update({"uec/band_state": float(self.band_state), "uec/explore_temperature": strat.params.explore_temperature,
                    "uec/explore_samples": float(strat.params.explore_samples), "uec/replay_freq": float(filt.params.replay_freq)})
        if knob:
            out["uec/entropy_coef"] = self._coef(trainer)
        return out

    # ------------------------------------------------------------ the probe
    @staticmethod
    def mechanism_rows(batch, n_train: int) -> Dict[str, list]:
        """Row indices per mechanism in the batch ``eframe_filter`` returned (its first ``n_train`` rows are the
        rows popped from the pending FIFO, the rest are replayed): ``replay`` = the replayed rows, ``explore`` =
        exploration-round rows among the first ``n_train`` (``extras["explore"]`` > 0.5)."""
        n = len(batch) if batch is not None else 0
        if not n:
            return {m: [] for m in MECHANISMS}
        ex = torch.nan_to_num(batch.extras.get("explore", torch.zeros(n)).float()) > 0.5
        return {"replay": list(range(min(n_train, n), n)),
                "explore": [i for i in range(min(n_train, n)) if bool(ex[i])]}

    def before_update(self, trainer: Any, batch) -> None:
        """Per-mechanism probe: from the weights theta_0 the real update starts from, run the trainer's own
        update on one mechanism's rows alone, measure the probe entropy, and restore weights, optimizer state
        and RNG exactly (the real update that follows is unchanged).  Every rank runs the same updates."""
        self._mech = {}
        p = self.params
        if not (p.probe_samples > 0 and p.probe_mechanisms) or self.probe is None or self.probe_entropy is None:
            return
        if getattr(trainer, "_deepspeed", False):
            if not getattr(self, "_warned", False):
                log.warning("uec: probe_mechanisms is skipped under DeepSpeed (no cheap weight/optimizer snapshot)")
                self._warned = True
            return
        from ..metrics import MetricSums

        _, filt = self._parts(trainer)
        rows = self.mechanism_rows(batch, int(getattr(filt, "_n_trained", 0)))
        todo = [m for m in MECHANISMS if trainer._any(bool(rows[m]))]
        if not todo:
            return
        model = trainer.acc.unwrap_model(trainer.policy)
        params = [q for q in model.parameters()]
        saved = [q.detach().clone() for q in params]
        opt_state = copy.deepcopy(trainer.optimizer.state_dict())
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            for m in todo:
                sub = batch.select(rows[m]) if rows[m] else None
                trainer._update(sub, MetricSums())
                self._mech[m] = self.entropy_of(trainer, self.probe)
                with torch.no_grad():
                    for q, v in zip(params, saved):
                        q.copy_(v)
                trainer.optimizer.load_state_dict(copy.deepcopy(opt_state))
                trainer.optimizer.zero_grad(set_to_none=True)
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
        finally:
            del saved, opt_state

    def _probe_step(self, trainer, strat: EFRameRollout, metrics: Dict[str, float]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        updated = metrics.get("eframe/update", 0.0) > 0
        if self.probe is not None and self.probe_entropy is not None and updated:
            before, after = self.probe_entropy, self.entropy_of(trainer, self.probe)
            out["uec/entropy_before_update"], out["uec/entropy_after_update"] = before, after
            for m, h in self._mech.items():
                out[f"uec/entropy_before_{m}"], out[f"uec/entropy_after_{m}"] = before, h
                out[f"uec/entropy_delta_{m}"] = h - before
        self._mech = {}
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
        return {"smoothed": self.smoothed, "scale": self.scale, "band_state": self.band_state, "coef": self.coef,
                "probe": _batch_to_state(self.probe), "probe_entropy": self.probe_entropy}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.smoothed, self.scale = state["smoothed"], state["scale"]
        self.band_state = int(state["band_state"])
        self.coef = state.get("coef")
        self.probe = _batch_from_state(state["probe"])
        self.probe_entropy = state["probe_entropy"]
