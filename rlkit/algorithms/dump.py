"""DUMP: a distribution-level UCB curriculum over data sources.

Paper arXiv 2504.09710 (Wang et al.); official code github.com/ZhentingWang/DUMP
(``verl/utils/curriculum_learning.py``, a verl fork).  Method notes: ``docs/reproduce.md``.

The training set is split into *sources* by one dataset column (``source_field``:
``data_source``, MATH ``level`` or ``type``, ...).  After each step's advantage
stage, every response adds ``|mean of its token advantages|`` to its source's
sliding window (the last ``window`` = 300 responses).  Per source j:

    mu_j  = mean of the window                       (learnability: how much signal the source still gives)
    n_j   = responses seen so far (not windowed),  N = max(1, sum_j n_j)
    UCB_j = mu_j + exploration * sqrt(2 ln(N + 1) / (n_j + 1))
    w     = softmax(UCB / temperature)               (temperature 0.1, exploration 1.0 as the code)

Each batch is filled by drawing a source ~ w, then a prompt uniformly within that
source, with replacement.  Before the first update every source has mu = 0 and
n = 0, so the weights are uniform (as the code's initial weights).

Distributed: every rank draws the same prompts (one generator seeded with the
run seed; the trainer gives each rank its slice), and the advantage records of
all ranks are gathered in :meth:`DUMPSelector.update` (which every rank calls) in
rank order, so the windows, counts and weights are identical on every rank.
Resumable: windows, counts and the generator state are in ``state_dict``.

Not reproduced (quirks of the code the spec says to ignore): the unused Beta
success model, its reward thresholds and the validation-time update path.
"""
from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Sequence, Tuple

import torch

from ..batch import Batch
from ..plugins import PromptSelector
from ..registry import register_prompt_selector


def ucb_scores(mean_abs_adv: Sequence[float], counts: Sequence[int], exploration: float = 1.0) -> List[float]:
    """UCB_j = mu_j + c * sqrt(2 ln(N + 1) / (n_j + 1)), N = max(1, sum n_j) (the code's guard)."""
    total = max(1, int(sum(counts)))
    return [float(mu) + exploration * math.sqrt(2.0 * math.log(total + 1) / (int(n) + 1))
            for mu, n in zip(mean_abs_adv, counts)]


def softmax_weights(scores: Sequence[float], temperature: float = 0.1) -> List[float]:
    """softmax(scores / temperature), shifted by the max for stability."""
    if not scores:
        return []
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    z = sum(e)
    return [x / z for x in e]


def per_response_advantage(batch: Batch) -> torch.Tensor:
    """[S] mean token advantage over each response's mask (NaN for empty responses)."""
    mask = batch.response_mask.float()
    n = mask.sum(-1)
    mean = (batch.advantages.float() * mask).sum(-1) / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.full_like(mean, math.nan))


def _metric_name(source: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", source).strip("_") or "_"


@register_prompt_selector("dump")
class DUMPSelector(PromptSelector):
    """UCB over data sources (DUMP): softmax(UCB / 0.1) source weights, uniform prompt within the source."""

    @dataclass
    class Params:
        source_field: str = "data_source"   # dataset column naming each prompt's source (distribution)
        window: int = 300                    # per-source sliding window of per-response |advantage|
        temperature: float = 0.1             # softmax temperature over UCB scores
        exploration: float = 1.0             # weight of the exploration bonus
        log_per_source: bool = True          # dump/weight/<source>, dump/mean_abs_adv/<source>, ... every step

        def __post_init__(self):
            if not self.source_field:
                raise ValueError("dump: source_field must name a dataset column")
            if self.window < 1:
                raise ValueError(f"dump: window must be >= 1, got {self.window}")
            if not self.temperature > 0:
                raise ValueError(f"dump: temperature must be > 0, got {self.temperature}")
            if self.exploration < 0:
                raise ValueError(f"dump: exploration must be >= 0, got {self.exploration}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.sources: List[str] = []
        self.members: List[List[int]] = []                  # row indices of each source
        self.windows: Dict[str, Deque[float]] = {}
        self.counts: Dict[str, int] = {}
        self.gen = torch.Generator().manual_seed(int(self.ctx.seed) * 100003 + 17)
        self._pending: List[Tuple[str, float]] = []        # this rank's records since the last update
        self._drawn: Dict[str, int] = {}                    # prompts drawn per source since the last update

    # ------------------------------------------------------------ sources
    def bind(self, dataset) -> None:
        super().bind(dataset)
        field = self.params.source_field
        groups: Dict[str, List[int]] = {}
        for i, row in enumerate(dataset):
            if field not in row or row[field] is None:
                cols = sorted(k for k in row if k != "prompt_ids")
                raise ValueError(f"dump: training row {i} has no source column {field!r} "
                                 f"(algorithm.prompt_selector.source_field); columns: {cols}")
            groups.setdefault(str(row[field]), []).append(i)
        self.sources = sorted(groups)
        self.members = [groups[s] for s in self.sources]
        for s in self.sources:
            self.windows.setdefault(s, deque(maxlen=self.params.window))
            self.counts.setdefault(s, 0)

    def mean_abs_adv(self) -> List[float]:
        return [sum(self.windows[s]) / len(self.windows[s]) if self.windows[s] else 0.0 for s in self.sources]

    def ucb(self) -> List[float]:
        return ucb_scores(self.mean_abs_adv(), [self.counts[s] for s in self.sources], self.params.exploration)

    def weights(self) -> List[float]:
        return softmax_weights(self.ucb(), self.params.temperature)

    # ------------------------------------------------------------ selection
    def select(self, step: int, n: int) -> List[int]:
        if not self.sources:
            raise RuntimeError("dump: select() before bind()")
        w = torch.tensor(self.weights(), dtype=torch.float64)
        picks = torch.multinomial(w, n, replacement=True, generator=self.gen).tolist()
        out = []
        for j in picks:
            rows = self.members[j]
            out.append(rows[int(torch.randint(len(rows), (1,), generator=self.gen))])
            self._drawn[self.sources[j]] = self._drawn.get(self.sources[j], 0) + 1
        return out

    # ------------------------------------------------------------ updates
    def after_advantage(self, batch: Batch) -> Dict[str, float]:
        field = self.params.source_field
        srcs = batch.info.get(field)
        if batch.advantages is None or srcs is None:
            return {}
        for s, a in zip(srcs, per_response_advantage(batch).tolist()):
            if s is not None and not math.isnan(a):
                self._pending.append((str(s), abs(a)))
        return {}

    def record(self, records: Sequence[Tuple[str, float]]) -> None:
        """Add (source, |advantage|) records to the windows and counts (unknown sources are ignored)."""
        for s, a in records:
            if s in self.windows:
                self.windows[s].append(float(a))
                self.counts[s] += 1

    def update(self, batch: Batch) -> Dict[str, float]:
        local, self._pending = self._pending, []
        if self.ctx.world_size > 1:
            from accelerate.utils import gather_object

            records = [r for part in gather_object([local]) for r in part]
        else:
            records = local
        self.record(records)
        drawn, self._drawn = self._drawn, {}
        mus, ucb = self.mean_abs_adv(), self.ucb()
        w = softmax_weights(ucb, self.params.temperature)
        out: Dict[str, float] = {
            "dump/num_sources": float(len(self.sources)),
            "dump/records": float(len(records)),
            "dump/weight_entropy": -sum(x * math.log(x) for x in w if x > 0),
            "dump/max_weight": max(w) if w else 0.0,
        }
        if self.params.log_per_source:
            total_drawn = sum(drawn.values())
            for s, mu, u, x in zip(self.sources, mus, ucb, w):
                k = _metric_name(s)
                out[f"dump/weight/{k}"] = x                       # weights for the next selection
                out[f"dump/ucb/{k}"] = u
                out[f"dump/mean_abs_adv/{k}"] = mu
                out[f"dump/count/{k}"] = float(self.counts[s])
                out[f"dump/drawn_frac/{k}"] = drawn.get(s, 0) / total_drawn if total_drawn else 0.0
        return out

    # ------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"windows": {s: list(q) for s, q in self.windows.items()}, "counts": dict(self.counts),
                "rng": self.gen.get_state(), "pending": list(self._pending), "drawn": dict(self._drawn)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for s, vals in state.get("windows", {}).items():
            self.windows[s] = deque((float(v) for v in vals), maxlen=self.params.window)
        for s, n in state.get("counts", {}).items():
            self.counts[s] = int(n)
        if "rng" in state:
            self.gen.set_state(state["rng"])
        self._pending = [(str(s), float(a)) for s, a in state.get("pending", [])]
        self._drawn = {str(k): int(v) for k, v in state.get("drawn", {}).items()}
