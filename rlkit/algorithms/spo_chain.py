"""SPO-chain (Segment Policy Optimization, arXiv 2505.23564; shared parts in :mod:`rlkit.algorithms.spo`).

``rollout_strategy: spo_chain`` (:class:`SPOChainRollout`)
    Samples the normal group, finds the boundaries of every sample (code convention: the low-prob positions
    ``t`` with ``p < rho``, shifted to ``t - 1`` -- the last token *before* the low-prob token -- and every
    ``interval``-th of them kept), deduplicates identical ``prompt + prefix`` states (as the code does) and
    estimates ``V(c)`` as the mean reward of ``mc_samples`` continuations from every state with **one**
    ``engine.generate`` call for the whole step (prefix API).  Stores per-sample values in ``batch.extras``.
    ``p`` is the rollout log-prob at the rollout temperature (the engine-wide convention; the HF engine's
    values equal the trainer's ``old_logprobs``).
``advantage: spo_chain`` (:class:`SPOChainAdvantage`)
    Token advantages exactly as the code: ``A_k = V(c_k) - V(c_{k-1})`` between consecutive boundaries, the
    terminal value (the reward) on the last token, backfilled to the left (:func:`chain_token_advantages`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator, RolloutContext, RolloutStrategy
from ..registry import register_advantage, register_rollout_strategy
from ..rollout.base import Completion
from ..rollout.strategies import completions_to_batch, score

from .spo import EXTRA_PROMPT_VALUE, EXTRA_TERMINAL, EXTRA_VALUES, NAN, _nanmean, _require_strategy


def chain_boundaries(logprobs: Sequence[float], rho: float = 0.9, interval: int = 5) -> List[int]:
    """Segment boundaries of one response, as the official code computes them.

    ``low = [t : exp(logprob_t) < rho]``; ``boundaries = [t - 1 for t in low][::interval]``.  A boundary ``c``
    means the state ``prompt + response[:c + 1]``; ``c = -1`` is the bare prompt."""
    low = [t for t, lp in enumerate(logprobs) if math.exp(float(lp)) < rho]
    return [t - 1 for t in low][::max(1, int(interval))]


def chain_token_advantages(length: int, values: Dict[int, float], terminal: float,
                           prompt_value: Optional[float] = None) -> List[float]:
    """Pre-mask token advantages of one response (official code behaviour).

    ``values`` maps boundary positions ``c >= 0`` to ``V(c)``; ``terminal`` is the value of the last token
    (the reward); ``prompt_value`` is ``V(prompt)`` or ``None``.  Walking the valued positions left to right,
    ``A[c] = V(c) - V(previous)`` (``0`` for the first one when there is no prompt value), then every position
    takes the advantage of the next valued position at or to its right.  With no boundary at all (no low-prob
    token) and no prompt value the whole response gets 0 (the code returns zeros)."""
    if length <= 0:
        return []
    if terminal is None or not math.isfinite(terminal):
        return [0.0] * length
    if not values and prompt_value is None:
        return [0.0] * length
    vals = {int(c): float(v) for c, v in values.items() if 0 <= int(c) < length - 1 and v is not None and math.isfinite(v)}
    vals[length - 1] = float(terminal)
    base = prompt_value if prompt_value is not None and math.isfinite(prompt_value) else None
    adv = [0.0] * length
    prev = -1
    for c in sorted(vals):
        a = 0.0 if base is None else vals[c] - base
        base = vals[c]
        for i in range(prev + 1, c + 1):
            adv[i] = a
        prev = c
    return adv


# ------------------------------------------------------------------------ SPO-chain
@register_rollout_strategy("spo_chain")
class SPOChainRollout(RolloutStrategy):
    """SPO-chain rollouts: the normal group plus Monte Carlo values at segment boundaries.

    Params:
      rho:            cut-point threshold on the rollout probability (strict ``p < rho``).
      interval:       keep every ``interval``-th low-prob token as a boundary (code ``cutpoint_interval``).
      mc_samples:     N continuations per boundary state (paper: 9 for GSM8K; 4 is enough per the paper).
      prompt_value:   V(prompt) treatment.  ``code_quirk`` (default, the official code): the prompt is a state
                      only when the first low-prob token is the first response token (boundary -1), otherwise
                      the stretch before the first boundary gets advantage 0 -- those tokens all have
                      ``p >= rho``, so under the probability mask this changes nothing.  ``mc``: V(prompt) is
                      MC-estimated for every prompt (one shared state per group).  ``group_mean``: V(prompt)
                      = the mean terminal value of the prompt's group (no extra generation).
      unfinished_reward: value of a truncated response / continuation (code: ``unfinished_response_penalty``,
                      0 in the paper's configs); ``None`` keeps the verifier's reward.
    Writes ``batch.extras``: ``spo_values`` [S,T], ``spo_prompt_value`` [S], ``spo_terminal_value`` [S].
    """

    @dataclass
    class Params:
        rho: float = 0.9
        interval: int = 5
        mc_samples: int = 9
        prompt_value: Literal["code_quirk", "group_mean", "mc"] = "code_quirk"
        unfinished_reward: Optional[float] = None

        def __post_init__(self):
            if not 0.0 < self.rho <= 1.0:
                raise ValueError(f"spo_chain: rho must be in (0, 1], got {self.rho}")
            if self.interval < 1:
                raise ValueError(f"spo_chain: interval must be >= 1, got {self.interval}")
            if self.mc_samples < 1:
                raise ValueError(f"spo_chain: mc_samples must be >= 1, got {self.mc_samples}")
            if self.prompt_value not in ("code_quirk", "group_mean", "mc"):
                raise ValueError(f"spo_chain: prompt_value must be code_quirk, group_mean or mc, got {self.prompt_value!r}")

    def __call__(self, rows: List[Dict[str, Any]], rctx: RolloutContext) -> Batch:
        p = self.params
        comps = rctx.engine.generate([r["prompt_ids"] for r in rows], rctx.samples_per_prompt, rctx.sampling)
        batch = completions_to_batch(rows, comps, rctx.alloc_groups(len(rows)), rctx.pad_id)
        metrics = dict(score(batch, rctx.rewarder))
        S, T = batch.response_ids.shape
        row_of = [i for i, cs in enumerate(comps) for _ in cs]
        lengths = batch.response_lengths.tolist()
        max_new = int(rctx.sampling.max_new_tokens)

        terminal = batch.rewards.to(torch.float64).clone()
        if p.unfinished_reward is not None:
            terminal[batch.truncated.bool() & torch.isfinite(terminal)] = float(p.unfinished_reward)

        # boundary states, deduplicated by (prompt row, response prefix) as the code deduplicates queries
        keys: Dict[Tuple[int, Tuple[int, ...]], int] = {}
        states: List[Tuple[int, List[int]]] = []       # (row index, response prefix)

        def state(i: int, prefix: Sequence[int]) -> int:
            k = (i, tuple(prefix))
            if k not in keys:
                keys[k] = len(states)
                states.append((i, list(prefix)))
            return keys[k]

        sample_bounds: List[List[Tuple[int, int]]] = []  # per sample: (boundary c >= 0, state index)
        prompt_state: List[Optional[int]] = [None] * S
        n_bounds, no_cut = 0, 0
        for s in range(S):
            L = lengths[s]
            ids = batch.response_ids[s, :L].tolist()
            bnds = chain_boundaries(batch.rollout_logprobs[s, :L].tolist(), p.rho, p.interval)
            n_bounds += len(bnds)
            no_cut += int(not bnds)
            i = row_of[s]
            if p.prompt_value == "mc" or (p.prompt_value == "code_quirk" and bnds and bnds[0] == -1):
                prompt_state[s] = state(i, [])
            sample_bounds.append([(c, state(i, ids[:c + 1])) for c in bnds if c >= 0])

        # one engine call for every boundary state of the step; each continuation is cut to the response budget
        mc_values: List[float] = []
        extra_tokens = 0
        if states:
            budgets = [max(1, max_new - len(pre)) for _, pre in states]
            conts = rctx.engine.generate([list(rows[i]["prompt_ids"]) + pre for i, pre in states], p.mc_samples,
                                         replace(rctx.sampling, max_new_tokens=max(budgets)))
            tok = rctx.tokenizer
            mc_rows, mc_comps = [], []
            for (i, pre), budget, cs in zip(states, budgets, conts):
                mc_rows.append(rows[i])
                lst = []
                for c in cs:
                    extra_tokens += len(c.token_ids)
                    cut = len(c.token_ids) > budget
                    ct = c.token_ids[:budget]
                    full = pre + list(ct)
                    text = tok.decode(full, skip_special_tokens=True) if tok is not None else c.text
                    lst.append(Completion(token_ids=full, logprobs=[0.0] * len(pre) + list(c.logprobs[:budget]),
                                          finish_reason="length" if cut else c.finish_reason, text=text))
                mc_comps.append(lst)
            mc_batch = completions_to_batch(mc_rows, mc_comps, list(range(len(states))), rctx.pad_id,
                                            prompt_ids=[rows[i]["prompt_ids"] for i, _ in states])
            score(mc_batch, rctx.rewarder)
            r = mc_batch.rewards.to(torch.float64).clone()
            if p.unfinished_reward is not None:
                r[mc_batch.truncated.bool() & torch.isfinite(r)] = float(p.unfinished_reward)
            r = r.view(len(states), p.mc_samples)
            mc_values = [_nanmean(r[k].tolist()) for k in range(len(states))]
            metrics["spo/mc_reward_mean"] = _nanmean(r.flatten().tolist())
            metrics["spo/mc_truncation_rate"] = float(mc_batch.truncated.float().mean())

        values = torch.full((S, T), NAN, dtype=torch.float32)
        v0 = torch.full((S,), NAN, dtype=torch.float32)
        for s in range(S):
            for c, k in sample_bounds[s]:
                values[s, c] = mc_values[k]
            if prompt_state[s] is not None:
                v0[s] = mc_values[prompt_state[s]]
        if p.prompt_value == "group_mean":
            for rows_g in batch.group_index().values():
                v0[rows_g] = _nanmean(terminal[rows_g].tolist())
        batch.extras[EXTRA_VALUES] = values
        batch.extras[EXTRA_PROMPT_VALUE] = v0
        batch.extras[EXTRA_TERMINAL] = terminal.float()

        main_tokens = float(sum(lengths))
        metrics.update({
            "spo/boundaries_per_sample": n_bounds / max(S, 1),
            "spo/no_cutpoint_frac": no_cut / max(S, 1),
            "spo/mc_states": float(len(states)),
            "spo/extra_generated_tokens": float(extra_tokens),
            "spo/tokens_generated_per_trained_token": (main_tokens + extra_tokens) / max(main_tokens, 1.0),
        })
        self.last_metrics = metrics
        return batch

    def metrics(self) -> Dict[str, float]:
        return getattr(self, "last_metrics", {})


@register_advantage("spo_chain")
class SPOChainAdvantage(AdvantageEstimator):
    """Token advantages from the boundary values stored by the ``spo_chain`` rollout strategy
    (:func:`chain_token_advantages`, pre-mask; add ``token_weighting: [spo_prob_mask]`` for the mask and
    whitening).  A row whose terminal value is NaN (reward skipped) gets 0."""

    @classmethod
    def check_config(cls, cfg, params, key):
        _require_strategy(cfg, key, "spo_chain")

    def __call__(self, batch: Batch) -> None:
        for k in (EXTRA_VALUES, EXTRA_TERMINAL):
            if k not in batch.extras:
                raise ValueError(f"advantage spo_chain: batch.extras[{k!r}] is missing; use rollout.strategy: spo_chain")
        S, T = batch.response_ids.shape
        lengths = batch.response_lengths.tolist()
        vals, term = batch.extras[EXTRA_VALUES], batch.extras[EXTRA_TERMINAL]
        v0 = batch.extras.get(EXTRA_PROMPT_VALUE)
        adv = torch.zeros((S, T), dtype=torch.float32)
        for s in range(S):
            L = lengths[s]
            row = vals[s, :L]
            pos = torch.nonzero(torch.isfinite(row)).flatten().tolist()
            pv = float(v0[s]) if v0 is not None and math.isfinite(float(v0[s])) else None
            a = chain_token_advantages(L, {c: float(row[c]) for c in pos}, float(term[s]), pv)
            if L:
                adv[s, :L] = torch.tensor(a, dtype=torch.float32)
        adv = adv * batch.response_mask
        batch.advantages = adv
        batch.returns = adv.clone()
