"""SPO -- Segment Policy Optimization (SPO-chain, SPO-tree, probability mask).

Paper: Guo, Xu, Liu, Ye, Qiu, "Segment Policy Optimization: Effective Segment-Level Credit Assignment in
RL for Large Language Models", arXiv 2505.23564 (NeurIPS 2025).  Official code: github.com/AIFrameResearch/SPO
(HEAD b9fc6a2; ``math_episode_generator_with_mc_advantages.py``, ``hybrid_episode_generator.py``,
``tree_episode_generator.py``, ``trainers/ppo_trainer.py``).  Implementation spec: ``shared/specs/
credit_and_sampling.md`` Sec. 2.  Equation numbers are not quoted (not verified against the paper); the formulas are:

* deterministic token MDP with a terminal reward, so the advantage of a segment k = tokens (t_k, t_{k+1}] is
  ``A_k = V(s_{t_{k+1}}) - V(s_{t_k})`` (segment advantage = difference of state values at its boundaries);
* cut point = a token with ``p_old(y_t | s_t) < rho`` (rho = 0.9); probability mask ``M_t = 1[p_old < rho]``;
  loss ``L = -(1/Z) sum_t M_t min(r_t A_t, clip(r_t, 1 +- eps) A_t)`` (PPO-clip over the masked tokens only).

Plugins registered here (all chosen by name in a recipe, see ``docs/methods/spo.md``):

``rollout_strategy: spo_chain`` (:class:`SPOChainRollout`)
    Samples the normal group, finds the boundaries of every sample (code convention: the low-prob positions
    ``t`` with ``p < rho``, shifted to ``t - 1`` -- the last token *before* the low-prob token -- and every
    ``interval``-th of them kept), deduplicates identical ``prompt + prefix`` states (as the code does) and
    estimates ``V(c)`` as the mean reward of ``mc_samples`` continuations from every state with **one**
    ``engine.generate`` call for the whole step (prefix API).  Stores per-sample values in ``batch.extras``.
    ``p`` is the rollout log-prob at the rollout temperature (the engine-wide convention; the HF engine's
    values equal the trainer's ``old_logprobs``).
``advantage: spo_chain`` (:class:`SPOChainAdvantage`)
    Token advantages exactly as the code: differences of consecutive boundary values, the terminal value on the
    last token, backfilled to the left (:func:`chain_token_advantages`).
``rollout_strategy: spo_tree`` (:class:`SPOTreeRollout`)
    Per-prompt trees generated level by level, batched across all prompts of the step; each edge with a
    non-zero advantage becomes one training row (``prompt_ids`` = prompt + parent path); on-policy replay
    buffer (:class:`OnPolicyReplayBuffer`) as in the code.
``advantage: spo_tree`` (:class:`SPOTreeAdvantage`)
    Broadcasts the edge advantage stored by the strategy over the edge's tokens.
``token_weighting: spo_prob_mask`` (:class:`SPOProbMask`)
    Loss only on tokens with ``p < rho``, advantages zeroed where ``p > rho`` (the code's two comparisons) and
    advantages whitened with the mean / unbiased std over the masked tokens.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator, RolloutContext, RolloutStrategy, TokenWeighting
from ..registry import register_advantage, register_rollout_strategy, register_token_weighting
from ..rollout.base import Completion
from ..rollout.strategies import completions_to_batch, score

Tensor = torch.Tensor
NAN = float("nan")

# batch.extras keys written by the strategies
EXTRA_VALUES = "spo_values"              # [S,T] V(c) at boundary positions c >= 0, NaN elsewhere
EXTRA_PROMPT_VALUE = "spo_prompt_value"  # [S]   V(prompt) (NaN = none: the code's zero-advantage stretch)
EXTRA_TERMINAL = "spo_terminal_value"    # [S]   value assigned to the last response token (the reward)
EXTRA_EDGE_ADV = "spo_edge_advantage"    # [S]   SPO-tree: constant advantage of an edge row


# ---------------------------------------------------------------- pure helpers (unit-tested)
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


@dataclass(eq=False)
class TreeNode:
    """One node of an SPO tree: the segment generated from its parent's state."""
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: str = ""
    depth: int = 0                       # root = 0; a child of the root = 1
    parent: Optional["TreeNode"] = None
    children: List["TreeNode"] = field(default_factory=list)
    value: float = NAN                   # leaf: reward; internal: mean of the children's values
    reward: float = NAN                  # verifier reward (leaves only)
    row: int = -1                        # index of the prompt row

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path(self) -> List[int]:
        """Response tokens from the root to the end of this node."""
        segs, n = [], self
        while n is not None:
            segs.append(n.tokens)
            n = n.parent
        return [t for s in reversed(segs) for t in s]

    def add(self, child: "TreeNode") -> "TreeNode":
        child.parent, child.depth, child.row = self, self.depth + 1, self.row
        self.children.append(child)
        return child


def compute_tree_values(node: TreeNode) -> float:
    """Leaf value = its preset ``value`` (the reward); internal value = mean of the children's finite values
    (NaN when none is finite).  Recursive, fills ``node.value`` bottom-up."""
    if node.is_leaf:
        return node.value
    vs = [compute_tree_values(c) for c in node.children]
    vs = [v for v in vs if v is not None and math.isfinite(v)]
    node.value = math.fsum(vs) / len(vs) if vs else NAN
    return node.value


def tree_edge_advantages(root: TreeNode, method: str = "rloo", zero_tol: float = 1e-9) -> List[Tuple[TreeNode, TreeNode, float]]:
    """``(parent, child, advantage)`` for every edge with a non-zero finite advantage (call
    :func:`compute_tree_values` first).

    ``rloo`` (code default): ``V(n) - V(parent)``; ``grpo``: ``(V(n) - V(parent)) / (pop-std of the sibling
    values + 1e-8)``.  Siblings whose finite values are all equal give exactly 0; ``|A| <= zero_tol`` is treated
    as 0 (float residue of the mean) and the edge is dropped, as the code drops ``A == 0``."""
    out: List[Tuple[TreeNode, TreeNode, float]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        kids = node.children
        if not kids:
            continue
        sib = [c.value for c in kids if math.isfinite(c.value)]
        constant = len(sib) == 0 or max(sib) == min(sib)
        std = 0.0
        if method == "grpo" and sib:
            m = math.fsum(sib) / len(sib)
            std = math.sqrt(math.fsum((v - m) ** 2 for v in sib) / len(sib))
        for c in kids:
            if not (math.isfinite(c.value) and math.isfinite(node.value)) or constant:
                a = 0.0
            else:
                a = c.value - node.value
                if method == "grpo":
                    a = a / (std + 1e-8)
            if abs(a) > zero_tol and c.tokens:
                out.append((node, c, a))
        stack.extend(reversed(kids))
    # parents before children, siblings in generation order
    order = {id(n): i for i, n in enumerate(_preorder(root))}
    out.sort(key=lambda e: order[id(e[1])])
    return out


def _preorder(root: TreeNode) -> List[TreeNode]:
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(reversed(n.children))
    return out


class OnPolicyReplayBuffer:
    """The official code's ``OnPolicyReplayBuffer`` (``hybrid_episode_generator.py``).

    ``add_edges`` stamps new edges with the iteration; ``get_edges(iteration)`` first drops edges with
    ``iteration - edge.iteration >= max_age`` (8), then takes, per question (``edge["question"]``), all its edges
    or ``per_question`` (32) random ones, removes the taken edges from the buffer and returns them; the rest stay
    for later iterations.  The random choice uses the buffer's own ``random.Random`` so that a resumed run
    (``state_dict``) draws the same edges."""

    def __init__(self, max_age: int = 8, per_question: int = 32, seed: int = 0):
        self.max_age, self.per_question = int(max_age), int(per_question)
        self.edges: List[Dict[str, Any]] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.edges)

    def add_edges(self, new_edges: Sequence[Dict[str, Any]], iteration: int) -> None:
        for e in new_edges:
            e["iteration"] = int(iteration)
        self.edges.extend(new_edges)

    def get_edges(self, iteration: int) -> Tuple[List[Dict[str, Any]], int]:
        kept = [e for e in self.edges if iteration - e["iteration"] < self.max_age]
        removed = len(self.edges) - len(kept)
        self.edges = kept
        by_q: Dict[Any, List[Dict[str, Any]]] = {}
        for e in self.edges:
            by_q.setdefault(_hashable(e["question"]), []).append(e)
        sampled: List[Dict[str, Any]] = []
        for lst in by_q.values():
            sampled.extend(self.rng.sample(lst, self.per_question) if len(lst) > self.per_question else lst)
        taken = {id(e) for e in sampled}
        self.edges = [e for e in self.edges if id(e) not in taken]
        return sampled, removed

    def state_dict(self) -> Dict[str, Any]:
        return {"edges": [dict(e) for e in self.edges], "rng": self.rng.getstate(),
                "max_age": self.max_age, "per_question": self.per_question}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.edges = [dict(e) for e in state.get("edges", [])]
        if "rng" in state:
            st = state["rng"]
            self.rng.setstate((st[0], tuple(st[1]), st[2]) if isinstance(st, (list, tuple)) else st)


def _hashable(x):
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


def _empty_batch() -> Batch:
    return Batch(prompt_ids=[], response_ids=torch.zeros(0, 1, dtype=torch.long), response_mask=torch.zeros(0, 1),
                 group_ids=torch.zeros(0, dtype=torch.long), rollout_logprobs=torch.zeros(0, 1),
                 truncated=torch.zeros(0, dtype=torch.bool), rewards=torch.zeros(0))


def _nanmean(xs: Sequence[float]) -> float:
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return math.fsum(v) / len(v) if v else NAN


def _row_columns(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in row.items() if k != "prompt_ids"}


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


# ------------------------------------------------------------------------- SPO-tree
@register_rollout_strategy("spo_tree")
class SPOTreeRollout(RolloutStrategy):
    """SPO-tree rollouts: per-prompt trees, one training row per edge with a non-zero advantage.

    Params:
      branching:        children per node at each depth (``[6, 6, 6]``); the depth is ``len(branching)``.
      segment_tokens:   M, tokens generated by every non-final level (the last level runs to EOS or to
                        ``rollout.max_new_tokens`` for the whole root-to-leaf response).
      adv_method:       ``rloo`` (code default, paper): ``V(n) - V(parent)``; ``grpo``: divided by the
                        population std of the sibling values + 1e-8.
      unfinished_reward: value of a leaf truncated at the response budget (code: 0); ``None`` = verifier reward.
      replay:           on-policy replay buffer (code ``OnPolicyReplayBuffer``); ``replay_max_age`` (8) and
                        ``replay_edges_per_question`` (32).
      replay_old_logprobs: the PPO "old" log-probs of replayed edges: ``generation`` (code: the log-probs stored
                        when the edge was generated, so the ratio is against the generating policy; the strategy then
                        asks for the scoring pass so that fresh edges are scored at the current weights) or
                        ``current`` (every row re-scored at the current weights).
    ``rollout.samples_per_prompt`` is not used (the tree defines the samples).  Edge rows: ``prompt_ids`` =
    prompt + the parent's path, response = the segment, ``group_ids`` = the prompt's group id (replayed edges
    keep the id of the step that generated them), ``rewards`` = V(child), ``extras["spo_edge_advantage"]``.
    """

    @dataclass
    class Params:
        branching: List[int] = field(default_factory=lambda: [6, 6, 6])
        segment_tokens: int = 600
        adv_method: Literal["rloo", "grpo"] = "rloo"
        unfinished_reward: Optional[float] = None
        replay: bool = True
        replay_max_age: int = 8
        replay_edges_per_question: int = 32
        replay_old_logprobs: Literal["generation", "current"] = "generation"

        def __post_init__(self):
            if self.replay_old_logprobs not in ("generation", "current"):
                raise ValueError(f"spo_tree: replay_old_logprobs must be generation or current, got {self.replay_old_logprobs!r}")
            if not self.branching or any(int(b) < 1 for b in self.branching):
                raise ValueError(f"spo_tree: branching must be a non-empty list of integers >= 1, got {self.branching}")
            if self.segment_tokens < 1:
                raise ValueError(f"spo_tree: segment_tokens must be >= 1, got {self.segment_tokens}")
            if self.adv_method not in ("rloo", "grpo"):
                raise ValueError(f"spo_tree: adv_method must be rloo or grpo, got {self.adv_method!r}")
            if self.replay_max_age < 1 or self.replay_edges_per_question < 1:
                raise ValueError("spo_tree: replay_max_age and replay_edges_per_question must be >= 1")

    @classmethod
    def check_config(cls, cfg, params, key):
        from ..config import ConfigError

        need = params.segment_tokens * (len(params.branching) - 1)
        if need >= cfg.rollout.max_new_tokens:
            raise ConfigError(f"{key}: segment_tokens x (depth - 1) = {need} must be < rollout.max_new_tokens="
                              f"{cfg.rollout.max_new_tokens} (the last level needs a budget)")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        p = self.params
        self.buffer = OnPolicyReplayBuffer(p.replay_max_age, p.replay_edges_per_question,
                                           seed=int(self.ctx.seed) * 7919 + int(self.ctx.rank))
        self.keep_generation_logprobs = p.replay and p.replay_old_logprobs == "generation"
        self.needs = frozenset({"old_logprobs"}) if self.keep_generation_logprobs else frozenset()

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])

    def __call__(self, rows: List[Dict[str, Any]], rctx: RolloutContext) -> Batch:
        p = self.params
        D = len(p.branching)
        max_new = int(rctx.sampling.max_new_tokens)
        gids = rctx.alloc_groups(len(rows))
        roots = [TreeNode(row=i) for i in range(len(rows))]
        frontier = list(roots)
        leaves: List[TreeNode] = []
        generated = 0
        for d, b in enumerate(p.branching):
            if not frontier:
                break
            last = d == D - 1
            budget = max_new - d * p.segment_tokens if last else p.segment_tokens
            prefixes = [list(rows[n.row]["prompt_ids"]) + n.path() for n in frontier]
            comps = rctx.engine.generate(prefixes, int(b), replace(rctx.sampling, max_new_tokens=budget))
            nxt = []
            for node, cs in zip(frontier, comps):
                for c in cs:
                    child = node.add(TreeNode(tokens=list(c.token_ids), logprobs=list(c.logprobs), finish_reason=c.finish_reason))
                    generated += len(c.token_ids)
                    if last or c.finish_reason != "length" or not c.token_ids:
                        leaves.append(child)       # finished early (EOS / stop string) or the final level
                    else:
                        nxt.append(child)
            frontier = nxt

        # score every leaf of every tree in one rewarder call (the full root-to-leaf response)
        metrics: Dict[str, float] = {}
        if leaves:
            tok = rctx.tokenizer
            comps_l = []
            for leaf in leaves:
                ids = leaf.path()
                text = tok.decode(ids, skip_special_tokens=True) if tok is not None else ""
                comps_l.append([Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason=leaf.finish_reason, text=text)])
            lb = completions_to_batch([rows[l.row] for l in leaves], comps_l, [gids[l.row] for l in leaves], rctx.pad_id)
            metrics.update({f"spo/leaf_{k}": v for k, v in score(lb, rctx.rewarder).items()})
            for leaf, r, trunc in zip(leaves, lb.rewards.tolist(), lb.truncated.tolist()):
                leaf.reward = float(r)
                leaf.value = float(p.unfinished_reward) if (trunc and p.unfinished_reward is not None and math.isfinite(r)) else float(r)
            metrics["spo/leaf_reward_mean"] = _nanmean([l.reward for l in leaves])
            metrics["spo/leaf_truncation_rate"] = float(lb.truncated.float().mean())

        new_edges: List[Dict[str, Any]] = []
        n_edges_total, zero_adv_tokens = 0, 0
        for i, root in enumerate(roots):
            compute_tree_values(root)
            kept = tree_edge_advantages(root, p.adv_method)
            kept_ids = {id(c) for _, c, _ in kept}
            for n in _preorder(root)[1:]:
                n_edges_total += 1
                if id(n) not in kept_ids:
                    zero_adv_tokens += len(n.tokens)
            cols = _row_columns(rows[i])
            prompt = list(rows[i]["prompt_ids"])
            for parent, child, a in kept:
                leaf = child.is_leaf
                new_edges.append({
                    "question": prompt, "group": int(gids[i]), "row": cols,
                    "prompt_ids": prompt + parent.path(), "tokens": list(child.tokens), "logprobs": list(child.logprobs),
                    "finish_reason": child.finish_reason if leaf else "segment",
                    "truncated": bool(leaf and child.finish_reason == "length"),
                    "advantage": float(a), "value": float(child.value), "leaf": leaf, "depth": child.depth,
                })

        step = int(rctx.step)
        if p.replay:
            self.buffer.add_edges(new_edges, step)
            edges, discarded = self.buffer.get_edges(step)
            metrics["spo/replay_discarded"] = float(discarded)
            metrics["spo/replay_size"] = float(len(self.buffer))
        else:
            edges = new_edges
        batch = self._edges_to_batch(edges, rctx, step)
        trained = float(batch.response_mask.sum()) if len(batch) else 0.0
        metrics.update({
            "spo/tree_leaves": float(len(leaves)),
            "spo/tree_edges": float(n_edges_total),
            "spo/edges_nonzero": float(len(new_edges)),
            "spo/edges_trained": float(len(batch)),
            "spo/edges_replayed": float(sum(1 for e in edges if e.get("iteration", step) != step)),
            "spo/generated_tokens": float(generated),
            "spo/extra_generated_tokens": float(zero_adv_tokens),
            "spo/tokens_generated_per_trained_token": generated / max(trained, 1.0),
        })
        self.last_metrics = metrics
        return batch

    def _edges_to_batch(self, edges: List[Dict[str, Any]], rctx: RolloutContext, step: int) -> Batch:
        if not edges:
            return _empty_batch()
        tok = rctx.tokenizer
        comps = [[Completion(token_ids=e["tokens"], logprobs=e["logprobs"], finish_reason=e["finish_reason"],
                             text=tok.decode(e["tokens"], skip_special_tokens=True) if tok is not None else "")] for e in edges]
        b = completions_to_batch([e["row"] for e in edges], comps, [e["group"] for e in edges], rctx.pad_id,
                                 prompt_ids=[e["prompt_ids"] for e in edges])
        b.truncated = torch.tensor([e["truncated"] for e in edges], dtype=torch.bool)
        b.rewards = torch.tensor([e["value"] for e in edges], dtype=torch.float32)
        b.extras[EXTRA_EDGE_ADV] = torch.tensor([e["advantage"] for e in edges], dtype=torch.float32)
        b.info["spo_depth"] = [e["depth"] for e in edges]
        b.info["spo_leaf"] = [e["leaf"] for e in edges]
        born = torch.tensor([float(e.get("iteration", step)) for e in edges])
        b.info["spo_age"] = [step - int(x) for x in born.tolist()]
        b.extras["rollout_step"] = born        # replayed edges stay out of the trainer's weight-sync gap check
        if self.keep_generation_logprobs:      # replayed edges: PPO ratio against the generating policy (code)
            b.old_logprobs = b.rollout_logprobs.clone()
            b.extras["keep_old_logprobs"] = (born != step).float()
        return b

    def metrics(self) -> Dict[str, float]:
        return getattr(self, "last_metrics", {})


@register_advantage("spo_tree")
class SPOTreeAdvantage(AdvantageEstimator):
    """Constant per-edge advantage (computed at tree time by the ``spo_tree`` strategy) on every token of the edge."""

    @classmethod
    def check_config(cls, cfg, params, key):
        _require_strategy(cfg, key, "spo_tree")

    def __call__(self, batch: Batch) -> None:
        if EXTRA_EDGE_ADV not in batch.extras:
            raise ValueError(f"advantage spo_tree: batch.extras[{EXTRA_EDGE_ADV!r}] is missing; use rollout.strategy: spo_tree")
        a = torch.nan_to_num(batch.extras[EXTRA_EDGE_ADV].float(), nan=0.0)
        adv = a[:, None] * batch.response_mask
        batch.advantages = adv
        batch.returns = adv.clone()


def _require_strategy(cfg, key: str, name: str) -> None:
    from ..config import ConfigError

    strat = getattr(getattr(cfg, "rollout", None), "strategy", None)
    if strat is not None and strat.name != name:
        raise ConfigError(f"{key}: advantage {name!r} reads values stored by the {name!r} rollout strategy; "
                          f"set rollout.strategy: {name} (got {strat.name!r})")


# ------------------------------------------------------------------ probability mask
def prob_mask_advantages(advantages: Tensor, logprobs: Tensor, mask: Tensor, rho: float = 0.9,
                         whiten: bool = True) -> Tuple[Tensor, Tensor]:
    """The code's probability mask on one batch.  Returns ``(advantages, loss_mask)``:
    ``loss_mask = mask & (p < rho)``; advantages are set to 0 where ``p > rho`` (the code's ``> 0.9``), then,
    with ``whiten``, whitened with the mean and unbiased std over ``loss_mask`` ((A - mean) / sqrt(var + 1e-8))
    and 0 outside it.  Fewer than two masked tokens or all-equal masked values give zeros."""
    from ..objectives._utils import masked_whiten

    m = mask > 0
    p = torch.exp(logprobs.to(torch.float64))
    loss_mask = m & (p < rho)
    a = advantages.to(torch.float64)
    a = torch.where(m & ~(p > rho), a, torch.zeros_like(a))
    if whiten:
        a = masked_whiten(a, loss_mask)
    return a.to(torch.float32), loss_mask


@register_token_weighting("spo_prob_mask")
class SPOProbMask(TokenWeighting):
    """Probability mask + masked whitening (SPO's loss, ``use_prob_mask`` / ``whiten_advantages`` in the code).

    Params:
      rho:    threshold (0.9); loss on ``p < rho`` only, advantages zeroed where ``p > rho``.
      whiten: whiten advantages over the loss-masked tokens of the step's batch (per rank).
      source: which probabilities: ``rollout`` (default: the engine's log-probs at the rollout temperature,
              the same numbers the chain cut points use; for replayed tree edges they are the generating
              policy's, as in the code) or ``old`` (the trainer's ``old_logprobs``; forces the scoring pass).
    Works with any advantage estimator (the paper's "GRPO + prob mask" ablation)."""

    @dataclass
    class Params:
        rho: float = 0.9
        whiten: bool = True
        source: Literal["rollout", "old"] = "rollout"

        def __post_init__(self):
            if not 0.0 < self.rho <= 1.0:
                raise ValueError(f"spo_prob_mask: rho must be in (0, 1], got {self.rho}")
            if self.source not in ("rollout", "old"):
                raise ValueError(f"spo_prob_mask: source must be rollout or old, got {self.source!r}")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.needs = frozenset({"old_logprobs"}) if self.params.source == "old" else frozenset()

    def __call__(self, batch: Batch) -> None:
        p = self.params
        lp = batch.rollout_logprobs if p.source == "rollout" else batch.old_logprobs
        if lp is None:
            raise ValueError(f"spo_prob_mask: batch has no {'rollout_logprobs' if p.source == 'rollout' else 'old_logprobs'}")
        if batch.advantages is None:
            raise ValueError("spo_prob_mask: runs after the advantage stage (batch.advantages is None)")
        if batch.token_weights is None:
            batch.token_weights = torch.ones_like(batch.response_mask)
        live = batch.weights() > 0           # tokens some earlier weighting / sample weight already dropped stay out
        adv, loss_mask = prob_mask_advantages(batch.advantages, lp, live.float(), p.rho, p.whiten)
        batch.token_weights = batch.token_weights * loss_mask.to(batch.token_weights.dtype)
        batch.advantages = adv * batch.response_mask
