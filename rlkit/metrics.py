"""Metric helpers: masked statistics and cross-rank reduction.

Metrics are accumulated as (sum, count) pairs plus running max/min, then
reduced across ranks, so a global mean is weighted by samples or tokens
rather than averaged per rank.  Padding never enters: every token statistic
takes the response mask.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict

import torch


class MetricSums:
    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, float] = defaultdict(float)
        self.maxes: Dict[str, float] = {}
        self.mins: Dict[str, float] = {}
        self.values: Dict[str, float] = {}      # already-global scalars (timings, lr): taken from rank 0
        self.totals: Dict[str, float] = defaultdict(float)   # summed over ranks, reported as a sum

    def mean(self, key: str, total: float, count: float) -> None:
        if math.isfinite(total):  # count may be 0 on ranks that only contribute to the sum
            self.sums[key] += float(total)
            self.counts[key] += float(count)

    def masked(self, key: str, x: torch.Tensor, mask: torch.Tensor, extremes: bool = False) -> None:
        m = mask.bool()
        if m.any():
            v = x.detach().float()[m]
            self.mean(key + "/mean", v.sum().item(), v.numel())
            if extremes:
                self.max(key + "/max", v.max().item())
                self.min(key + "/min", v.min().item())

    def std(self, key: str, x: torch.Tensor) -> None:
        """Sample standard deviation of the finite values of ``x`` across every rank (sum, sum of squares, count)."""
        v = x.detach().double().flatten()
        v = v[torch.isfinite(v)]
        self.totals[f"_std/{key}/n"] += float(v.numel())
        self.totals[f"_std/{key}/s"] += float(v.sum())
        self.totals[f"_std/{key}/q"] += float((v * v).sum())

    def max(self, key: str, v: float) -> None:
        if math.isfinite(v):
            self.maxes[key] = max(self.maxes.get(key, -math.inf), v)

    def min(self, key: str, v: float) -> None:
        if math.isfinite(v):
            self.mins[key] = min(self.mins.get(key, math.inf), v)

    def total(self, key: str, v: float) -> None:
        self.totals[key] += float(v)

    def set(self, key: str, v: float) -> None:
        self.values[key] = float(v)

    def reduce(self, accelerator=None) -> Dict[str, float]:
        parts = [self._raw()]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([self._raw()])
        sums, counts, maxes, mins, totals = defaultdict(float), defaultdict(float), {}, {}, defaultdict(float)
        for p in parts:
            for k, v in p["totals"].items():
                totals[k] += v
            for k, v in p["sums"].items():
                sums[k] += v
            for k, v in p["counts"].items():
                counts[k] += v
            for k, v in p["maxes"].items():
                maxes[k] = max(maxes.get(k, -math.inf), v)
            for k, v in p["mins"].items():
                mins[k] = min(mins.get(k, math.inf), v)
        out = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
        out.update(maxes)
        out.update(mins)
        for k in [k for k in totals if k.startswith("_std/") and k.endswith("/n")]:
            n, s_, q = totals.pop(k), totals.pop(k[:-1] + "s"), totals.pop(k[:-1] + "q")
            if n > 1:
                out[k[len("_std/"):-len("/n")]] = math.sqrt(max(q - s_ * s_ / n, 0.0) / (n - 1))
        out.update(totals)
        out.update(parts[0]["values"])
        return out

    def merge(self, raw) -> None:
        """Add another MetricSums' ``_raw()`` partials (a rollout worker's) into this one."""
        for k, v in raw.get("sums", {}).items():
            self.sums[k] += v
        for k, v in raw.get("counts", {}).items():
            self.counts[k] += v
        for k, v in raw.get("totals", {}).items():
            self.totals[k] += v
        for k, v in raw.get("maxes", {}).items():
            self.max(k, v)
        for k, v in raw.get("mins", {}).items():
            self.min(k, v)

    def _raw(self):
        return {"sums": dict(self.sums), "counts": dict(self.counts), "maxes": dict(self.maxes), "mins": dict(self.mins),
                "values": dict(self.values), "totals": dict(self.totals)}


def nan_mean(x: torch.Tensor) -> float:
    x = x.float()
    ok = ~torch.isnan(x)
    return x[ok].mean().item() if ok.any() else float("nan")
