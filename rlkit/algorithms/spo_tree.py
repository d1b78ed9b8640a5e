"""SPO-tree (Segment Policy Optimization, arXiv 2505.23564; shared parts in :mod:`rlkit.algorithms.spo`).

``rollout_strategy: spo_tree`` (:class:`SPOTreeRollout`)
    Per-prompt trees generated level by level, batched across all prompts of the step; leaf value = reward,
    internal value = mean of its children's values; each edge with a non-zero advantage ``V(n) - V(parent)``
    becomes one training row (``prompt_ids`` = prompt + parent path); on-policy replay buffer
    (:class:`OnPolicyReplayBuffer`) as in the code.
``advantage: spo_tree`` (:class:`SPOTreeAdvantage`)
    Broadcasts the edge advantage stored by the strategy over the edge's tokens.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch

from ..batch import Batch
from ..plugins import AdvantageEstimator, RolloutContext, RolloutStrategy
from ..registry import register_advantage, register_rollout_strategy
from ..rollout.base import Completion
from ..rollout.strategies import completions_to_batch, score

from .spo import EXTRA_EDGE_ADV, NAN, _empty_batch, _hashable, _nanmean, _require_strategy, _row_columns


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
