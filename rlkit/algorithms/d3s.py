"""D³S: Dynamic Dual-level Down-Sampling (``d3s_samples``, ``d3s_tokens``, ``d3s_schedule``).

Paper: Wang, Yang, Tian, Shi, Ma, Liu, Yao, Ding, "Dynamic Dual-Level
Down-Sampling for Policy Optimization", arXiv:2509.22115 (ICLR 2026).  No
public code; the spec (../shared/specs/credit_and_sampling.md, Sec. 3) is built
from the abstract, a paper digest and the OpenReview reviews, so every numeric
default below is **[INFERRED]** (the spec's placeholders) unless noted.

Three plugins that compose with any advantage estimator and policy loss:

* ``d3s_samples`` (ExperienceFilter, ``post_advantage``) -- sample level.
  Keep the size-N subset S of rows that maximises the variance of the rows'
  advantages Var(A_S), either over the whole (rank-local) batch ("D³S",
  cross-group, the default, ``scope: batch``) or inside each group ("D³S-I",
  ``scope: group``).  Advantages are the ones computed on the FULL groups
  before down-sampling and are not re-normalised.  The exact optimum of
  max-variance-subset-of-size-N is "the k largest + the N-k smallest" for some
  k (the PODS result); we sort once and scan k = 0..N with prefix sums
  (O(n log n)).  ``balanced: true`` fixes k = floor(N/2) (N_pos = N_neg).
  Only rows with a non-zero advantage are candidates (this drops all-correct /
  all-wrong groups); if fewer than N exist we keep fewer ([INFERRED],
  ``fill: fewer``) or top up with zero-advantage rows (``fill: zero_advantage``).
  A row's advantage is the mean of its token advantages (exactly A_i for
  outcome estimators such as GRPO; for TEMPO the per-row mean).
  N = round(keep * size), at least 1, where size = rows in the batch (or in
  the group).

* ``d3s_tokens`` (TokenWeighting) -- token level.  Score s[i,t] = |A[i,t]| *
  H[i,t] over the real tokens of the kept rows, H = entropy of the sampling
  policy from the trainer's scoring pass (``needs = {"entropy"}``: no extra
  forward pass); keep the top ceil(K * count) tokens (at least 1) pooled over
  the batch (``scope: batch``, [INFERRED] from the paper's notation) or per
  sequence (``scope: sequence``); the others get weight 0.  Ties are broken by
  (row, position).  Zero-score tokens (H = 0 or A = 0) are kept whenever fewer
  than ceil(K * count) candidates score above 0: the count is filled in
  (row, position) order, as the spec's pseudocode (stable top-ceil(K * count))
  defines it; e.g. entropies [[1,0,0,0],[0,0,0,0]] with K = 0.5 keep (0,0) and
  three zero-entropy tokens (0,1), (0,2), (0,3).  The spec's remark "tokens
  with H = 0 are never kept unless K = 100%" holds only when enough tokens
  score above 0.

* ``d3s_schedule`` (Controller) -- the dynamic schedule, linear in training
  progress p in [0, 1]::

      [N(p), K(p)] = (1 - p) * [N_init, K_init] + p * [N_final, K_final]

  N_init / K_init are the configured ``keep`` / ``top_frac`` of the two
  plugins (the values of step 1); N_final / K_final are this controller's
  ``samples_final`` / ``tokens_final``.  After step s it writes the values for
  step s + 1, with p = s / (total_steps - 1), into the live plugin instances
  (found on the trainer by type), so step 1 runs at N_init, K_init and the last
  step at N_final, K_final.  The live values are part of the plugins'
  checkpoint state, so a resumed run continues the schedule exactly.

Defaults ([INFERRED], spec 3.2): keep (N_init) = 0.5 of the batch,
samples_final = 1.0, top_frac (K_init) = 0.2, tokens_final = 1.0.  Loss: use
the recipe's policy loss and aggregation (``token_mean`` over kept tokens is
the [INFERRED] choice in the recipes).  With several processes, cross-group
selection is over each rank's own rows (groups never leave their rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch

from ..batch import Batch
from ..plugins import Controller, ExperienceFilter, TokenWeighting
from ..registry import register_controller, register_filter, register_token_weighting

Tensor = torch.Tensor


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _check_frac(name: str, key: str, v: float) -> None:
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name}: {key} must be in (0, 1], got {v}")


def max_variance_subset(values: Sequence[float] | Tensor, n: int, balanced: bool = False) -> List[int]:
    """Indices (ascending) of the size-``n`` subset of ``values`` with the largest
    (population) variance.

    The optimum is the k largest plus the n - k smallest values for some k; the
    values are sorted once, ascending and stable, and k = 0..n is scanned with
    prefix sums.  The "k largest" are the last k of that order and the "n - k
    smallest" the first n - k, so equal values are taken by index (the spec's
    example: A = [+,+,+,-,-,-,-,-], n = 4 -> rows {1, 2} and {3, 4}).  Among
    k's whose variance ties (within 1e-12 relative), the most balanced one
    (smallest |2k - n|), then the smallest k, wins.  ``balanced`` fixes
    k = n // 2.  ``n`` larger than ``len(values)`` is clipped."""
    x = (values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float64)).reshape(-1)
    m = int(x.size)
    n = min(int(n), m)
    if n <= 0:
        return []
    order = np.argsort(x, kind="stable")
    xs = x[order]
    c1 = np.concatenate([[0.0], np.cumsum(xs)])
    c2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    if balanced:
        k = n // 2
    else:
        ks = np.arange(n + 1)
        s1 = c1[n - ks] + c1[m] - c1[m - ks]
        s2 = c2[n - ks] + c2[m] - c2[m - ks]
        var = s2 / n - (s1 / n) ** 2
        best = float(var.max())
        tied = np.flatnonzero(var >= best - 1e-12 * max(1.0, abs(best))).tolist()
        k = min(tied, key=lambda j: (abs(2 * j - n), j))
    idx = order[: n - k].tolist() + (order[m - k:].tolist() if k else [])
    return sorted(idx)


def row_advantages(batch: Batch) -> Tensor:
    """[S] float64: mean token advantage over each row's real tokens (0 for an empty row).

    Accumulated in float64, so rows whose token advantages are equal get exactly equal means
    whatever their lengths (ties then break by index)."""
    if batch.advantages is None:
        raise ValueError("d3s: batch.advantages is not set; d3s_samples must run after the advantage stage "
                         "(stage post_advantage)")
    m = batch.response_mask
    s = torch.sum(batch.advantages * m, dim=-1, dtype=torch.float64)
    return s / m.sum(-1, dtype=torch.float64).clamp_min(1.0)


def _population_var(x: Tensor) -> float:
    return float(x.var(unbiased=False)) if x.numel() > 1 else 0.0


# ----------------------------------------------------------------- samples
@register_filter("d3s_samples")
class D3SSamples(ExperienceFilter):
    stage = "post_advantage"

    @dataclass
    class Params:
        keep: float = 0.5                # N as a fraction of the batch (or group); N_init of the schedule [INFERRED]
        scope: Literal["batch", "group"] = "batch"    # batch = D³S (cross-group), group = D³S-I
        balanced: bool = False           # fix N_pos = N_neg = N/2 instead of the exact search
        fill: Literal["fewer", "zero_advantage"] = "fewer"   # when < N rows have A != 0 [INFERRED]

        def __post_init__(self):
            _check_frac("d3s_samples", "keep", self.keep)
            if self.scope not in ("batch", "group"):
                raise ValueError(f"d3s_samples: scope must be 'batch' or 'group', got {self.scope!r}")
            if self.fill not in ("fewer", "zero_advantage"):
                raise ValueError(f"d3s_samples: fill must be 'fewer' or 'zero_advantage', got {self.fill!r}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.initial_keep = float(self.params.keep)   # the schedule's N_init
        self._m: Dict[str, float] = {}

    def set_keep(self, keep: float) -> None:
        """Called by ``d3s_schedule``."""
        _check_frac("d3s_samples", "keep", keep)
        self.params.keep = float(keep)

    def _select(self, a: List[float], rows: List[int], n: int) -> List[int]:
        cand = [i for i in rows if a[i] != 0.0]
        pick = [cand[j] for j in max_variance_subset([a[i] for i in cand], n, self.params.balanced)] if cand else []
        if len(pick) < n and self.params.fill == "zero_advantage":
            pick += [i for i in rows if a[i] == 0.0][: n - len(pick)]
        return pick

    def __call__(self, batch: Batch) -> Optional[Batch]:
        p = self.params
        a = row_advantages(batch)
        al = a.tolist()
        S = len(batch)
        if p.scope == "batch":
            keep = self._select(al, list(range(S)), max(1, _round_half_up(p.keep * S)))
        else:
            keep = []
            for rows in batch.group_index().values():
                keep += self._select(al, rows, max(1, _round_half_up(p.keep * len(rows))))
        keep = sorted(keep)
        kept = a[keep]
        self._m = {"d3s/keep": p.keep, "d3s/kept_samples": float(len(keep)), "d3s/kept_frac": len(keep) / max(S, 1),
                   "d3s/nonzero_samples": float((a != 0).sum()), "d3s/kept_pos": float((kept > 0).sum()),
                   "d3s/kept_neg": float((kept < 0).sum()), "d3s/adv_var_kept": _population_var(kept),
                   "d3s/adv_var_all": _population_var(a)}
        if not keep:
            return None
        if len(keep) == S:
            return batch
        return batch.select(keep)

    def metrics(self) -> Dict[str, float]:
        return dict(self._m)

    def state_dict(self) -> Dict[str, Any]:
        return {"keep": self.params.keep}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "keep" in state:
            self.params.keep = float(state["keep"])


# ------------------------------------------------------------------ tokens
@register_token_weighting("d3s_tokens")
class D3STokens(TokenWeighting):
    needs = frozenset({"entropy"})

    @dataclass
    class Params:
        top_frac: float = 0.2            # K: fraction of candidate tokens kept; K_init of the schedule [INFERRED]
        scope: Literal["batch", "sequence"] = "batch"   # pool the top-K over the batch [INFERRED] or per sequence

        def __post_init__(self):
            _check_frac("d3s_tokens", "top_frac", self.top_frac)
            if self.scope not in ("batch", "sequence"):
                raise ValueError(f"d3s_tokens: scope must be 'batch' or 'sequence', got {self.scope!r}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.initial_top_frac = float(self.params.top_frac)   # the schedule's K_init
        self._m: Dict[str, float] = {}

    def set_top_frac(self, top_frac: float) -> None:
        """Called by ``d3s_schedule``."""
        _check_frac("d3s_tokens", "top_frac", top_frac)
        self.params.top_frac = float(top_frac)

    @staticmethod
    def _count(frac: float, n: int) -> int:
        return max(1, math.ceil(frac * n - 1e-9)) if n else 0

    def keep_mask(self, batch: Batch, cand: Optional[Tensor] = None) -> Tensor:
        """[S,T] bool: the kept tokens (``cand``: the candidate tokens, default ``batch.weights() > 0``)."""
        if batch.entropy is None:
            raise ValueError("d3s_tokens: batch.entropy is not set; the trainer computes it in the scoring pass "
                             "for plugins with needs={'entropy'}")
        if batch.advantages is None:
            raise ValueError("d3s_tokens: batch.advantages is not set (token weighting runs after the advantage stage)")
        if cand is None:
            cand = batch.weights() > 0
        k_frac = self.params.top_frac
        if k_frac >= 1.0:
            return cand
        # selection in numpy: an O(n) partition instead of a full sort; ties at the threshold by (row, position)
        c = cand.detach().cpu().numpy()
        score = (batch.advantages.detach().float().abs() * batch.entropy.detach().float()).cpu().numpy()
        score = np.where(c, score, -np.inf).astype(np.float32)
        if self.params.scope == "batch":
            flat = score.reshape(-1)
            vals = flat[c.reshape(-1)]
            k = self._count(k_frac, int(vals.size))
            if k == 0:
                return cand.clone()
            # the k-th largest candidate score (torch's selection is robust to many equal values)
            thr = np.float32(torch.kthvalue(torch.from_numpy(vals), vals.size - k + 1).values.item())
            keep = flat > thr
            need = k - int(np.count_nonzero(keep))
            if need > 0:
                keep[np.flatnonzero(flat == thr)[:need]] = True
        else:
            T = score.shape[1]
            n = np.count_nonzero(c, axis=1)
            k = np.array([self._count(k_frac, int(x)) for x in n.tolist()], dtype=np.int64)
            asc = np.sort(score, axis=1)
            thr = np.take_along_axis(asc, np.clip(T - k, 0, T - 1)[:, None], axis=1)
            gt = score > thr
            eq = score == thr
            keep = (gt | (eq & (np.cumsum(eq, axis=1) <= (k - gt.sum(1))[:, None]))) & (k > 0)[:, None]
        return torch.from_numpy(keep.reshape(c.shape)).to(cand.device) & cand

    def __call__(self, batch: Batch) -> None:
        cand = batch.weights() > 0
        keep = self.keep_mask(batch, cand)
        self._m = {"d3s/top_frac": self.params.top_frac,
                   "d3s/kept_token_frac": int(torch.count_nonzero(keep)) / max(int(torch.count_nonzero(cand)), 1)}
        batch.token_weights = batch.token_weights * keep.to(batch.token_weights.dtype)

    def metrics(self) -> Dict[str, float]:
        return dict(self._m)

    def state_dict(self) -> Dict[str, Any]:
        return {"top_frac": self.params.top_frac}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "top_frac" in state:
            self.params.top_frac = float(state["top_frac"])


# ---------------------------------------------------------------- schedule
def _lerp(a: float, b: float, p: float) -> float:
    return (1.0 - p) * a + p * b


@register_controller("d3s_schedule")
class D3SSchedule(Controller):
    @dataclass
    class Params:
        samples_final: float = 1.0       # N_final as a fraction (d3s_samples.keep at the last step) [INFERRED]
        tokens_final: float = 1.0        # K_final (d3s_tokens.top_frac at the last step) [INFERRED]

        def __post_init__(self):
            _check_frac("d3s_schedule", "samples_final", self.samples_final)
            _check_frac("d3s_schedule", "tokens_final", self.tokens_final)

    @classmethod
    def check_config(cls, cfg, params, key: str) -> None:
        """A schedule needs a d3s_samples filter or a d3s_tokens weighting to drive (checked by type)."""
        from ..config import ConfigError
        from ..registry import FILTERS, TOKEN_WEIGHTING, PluginError

        def is_a(registry, spec, base) -> bool:
            try:
                return issubclass(registry.get(spec.name), base)
            except (PluginError, TypeError):  # an unknown name is reported at its own key
                return False

        a = cfg.algorithm
        found = any(is_a(FILTERS, s, D3SSamples) for s in a.filters) or \
            any(is_a(TOKEN_WEIGHTING, s, D3STokens) for s in a.token_weighting)
        if not found:
            raise ConfigError(f"{key}: d3s_schedule drives the d3s_samples filter (algorithm.filters) and the d3s_tokens "
                              f"token weighting (algorithm.token_weighting); the recipe has neither")

    def progress(self, completed_steps: int) -> float:
        """p for the step after ``completed_steps``: 0 at step 1, 1 at the last step."""
        total = max(int(self.ctx.total_steps), 1)
        return min(1.0, max(0.0, completed_steps / max(total - 1, 1)))

    def after_step(self, trainer: Any, metrics: Dict[str, float]) -> Dict[str, float]:
        p = self.progress(int(trainer.step_idx))
        samples = [f for f in getattr(trainer, "post_filters", []) if isinstance(f, D3SSamples)]
        tokens = [w for w in getattr(trainer, "token_weighting", []) if isinstance(w, D3STokens)]
        if not samples and not tokens:
            raise RuntimeError("d3s_schedule: the trainer has no d3s_samples filter and no d3s_tokens weighting to schedule")
        out = {"d3s/schedule_progress": p}
        for f in samples:
            f.set_keep(_lerp(f.initial_keep, self.params.samples_final, p))
            out["d3s/next_keep"] = f.params.keep
        for w in tokens:
            w.set_top_frac(_lerp(w.initial_top_frac, self.params.tokens_final, p))
            out["d3s/next_top_frac"] = w.params.top_frac
        return out
