"""TEMPO: tree-estimated mean prefix value advantages (``advantage: tempo``).

Paper: Tran, Yao, Yu, "Exploiting Tree Structure for Credit Assignment in RL
Training of LLMs", arXiv:2509.18314 (TEMPO = GRPO outcome advantage + a
branch-gated TD correction read off the prefix tree "P2T" of the group's
responses).  Official code: github.com/fatebreaker/tempo (a verl fork),
``compute_tempo_outcome_advantage`` in ``verl/trainer/ppo/core_algos.py``.
Spec: ../shared/specs/credit_and_sampling.md, Sec. 1.

For a group of responses with outcome rewards r, mean mu and unbiased std
sigma, and the prefix tree over the group's token sequences (EOS is a symbol),
let V(node) be the mean reward of the responses that pass through a node.  The
advantage of token t of response i is (spec Eq. in 1.2, [CODE])::

    A[i,t] = ( (r_i - mu)  +  td_coef * (V(y_{<=t}) - V(y_{<t})) ) / (sigma + eps)
               GRPO term                 TD term delta_t (gamma = 1)

and without the division when ``scale_by_std=False`` (Dr.GRPO style).  The TD
term is non-zero only where the prefix node branches *and* its children have
different mean rewards ("branch gating"); once a response's path is unique
it is 0.  ``td_coef = 1`` is what the official code does ([CODE]); other
values are an extension.

Implementation (O(total tokens) per group instead of the official
O(n^2 L) Python loop; same numbers):

1. Only rows that carry a learning signal enter the tree: rows with a finite
   reward in groups whose valid rewards are not all equal.  (A group whose
   rewards are all equal has sigma = 0 and every delta = 0, so A = 0 exactly;
   a singleton group gets A = 0 -- the official code gives NaN there, and
   verl's GRPO part r/1; we follow ``grpo``, which returns 0.  NaN-reward
   rows get A = 0 and are left out of every mean, as in ``grpo``.)
2. The sequences are the *unpadded* responses (length = last real token + 1,
   from ``response_mask``), so ``pad_token_id == eos_token_id`` cannot merge a
   finished response with a longer one (the official code compares padded ids
   and gets that case wrong).
3. The rows of each group are sorted lexicographically (the unpadded rows
   compared as big-endian uint32 bytes: one Python ``sorted`` over the batch,
   group id first); then every trie node is a contiguous run of sorted rows,
   and the longest common prefix (LCP) of a run is the minimum of the LCPs of
   adjacent rows, which are computed in one vectorised comparison.  The trie
   is walked as a radix tree (only branch nodes are visited, a few per row):
   a run with common prefix d splits at position d into its children (rows
   that end at d are members of the node but of no child); each child gets
   delta = mean(child) - mean(run) at column d.
4. A = GRPO term broadcast + td_coef * the (sparse) deltas, / (sigma + eps),
   zero on padding.  ``returns`` = the advantages (as ``grpo``).

If ``batch.token_rewards`` is set (KL in the reward), r_i = sum_t of the row's
token rewards (as ``grpo``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Tuple

import numpy as np
import torch

from ..batch import Batch
from ..objectives._utils import broadcast_rows, token_mask
from ..objectives.grpo import group_baseline
from ..plugins import AdvantageEstimator
from ..registry import register_advantage

Tensor = torch.Tensor


def prefix_tree_deltas(response_ids: Tensor, lengths: Tensor, group_ids: Tensor, rewards: Tensor,
                       rows: Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TD terms delta[i,t] = V(y_{<=t}) - V(y_{<t}) of the prefix trees of each group.

    ``rows`` [S] bool selects the rows that form the trees (and receive deltas);
    ``lengths`` [S] are the unpadded response lengths; ``rewards`` [S] float64.
    Returns the sparse non-zero entries as ``(row, column, delta)`` numpy arrays
    (every other (i, t) has delta 0)."""
    sel = torch.nonzero(rows).flatten().cpu().numpy()
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if sel.size < 2:
        return empty
    lens = lengths.cpu().numpy()[sel].astype(np.int64)
    T = int(lens.max())
    if T == 0:
        return empty
    gid = group_ids.cpu().numpy()[sel].tolist()
    R = rewards.cpu().numpy()[sel].astype(np.float64)
    # token ids as big-endian uint32: comparing the unpadded rows as bytes is comparing them lexicographically,
    # and a sequence sorts right before its extensions (padding never takes part)
    tb = response_ids[:, :T].cpu().numpy()[sel].astype(">u4")
    lens_l = lens.tolist()
    keys = [(gid[i], tb[i, :lens_l[i]].tobytes()) for i in range(sel.size)]
    order = np.asarray(sorted(range(sel.size), key=keys.__getitem__), dtype=np.int64)   # group id first
    tok_s, lens_s = tb[order], lens[order]
    gid_s = [gid[i] for i in order.tolist()]
    # LCP of adjacent sorted rows = first differing position, capped at the shorter length
    ne = tok_s[1:] != tok_s[:-1]
    first = np.where(ne.any(1), ne.argmax(1), T)
    lcp = np.minimum(first, np.minimum(lens_s[1:], lens_s[:-1])).tolist()
    csum = np.concatenate([[0.0], np.cumsum(R[order])]).tolist()
    lens_l = lens_s.tolist()
    bounds = [k + 1 for k in range(len(gid_s) - 1) if gid_s[k + 1] != gid_s[k]]

    out_pos: List[int] = []      # sorted positions
    out_col: List[int] = []
    out_val: List[float] = []
    for g0, g1 in zip([0] + bounds, bounds + [len(order)]):
        stack = [(g0, g1)]      # half-open runs of sorted rows = trie nodes with >= 2 rows
        while stack:
            a, b = stack.pop()
            if b - a < 2:
                continue
            inner = lcp[a:b - 1]
            d = min(inner)       # the run's common prefix length = the branching position
            parent = (csum[b] - csum[a]) / (b - a)
            start = a
            for k in [a + j + 1 for j, v in enumerate(inner) if v == d] + [b]:
                c0, c1 = start, k
                start = k
                if lens_l[c0] <= d:          # rows that end at d: no token there, no child
                    continue
                delta = (csum[c1] - csum[c0]) / (c1 - c0) - parent
                if delta != 0.0:
                    out_pos.extend(range(c0, c1))
                    out_col.extend([d] * (c1 - c0))
                    out_val.extend([delta] * (c1 - c0))
                if c1 - c0 >= 2:
                    stack.append((c0, c1))
    if not out_pos:
        return empty
    rows_orig = sel[order[np.asarray(out_pos, dtype=np.int64)]]
    return rows_orig, np.asarray(out_col, dtype=np.int64), np.asarray(out_val, dtype=np.float64)


def _lengths(mask: Tensor) -> Tensor:
    """[S] last real position + 1 (0 for an empty row); numpy, much cheaper than torch on big CPU batches."""
    m = mask.detach().cpu().numpy().astype(bool, copy=False)
    n = np.where(m.any(1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)
    return torch.from_numpy(n.astype(np.int64))


@register_advantage("tempo")
class TEMPO(AdvantageEstimator):
    @dataclass
    class Params:
        scale_by_std: bool = True            # False = Dr.GRPO-style (no division by sigma + eps)
        eps: float = 1e-6                    # official code / verl
        td_coef: float = 1.0                 # coefficient on the TD term; 1 in the official code [CODE]
        std_scope: Literal["group", "batch"] = "group"   # as grpo: "batch" = std of all valid rewards

        def __post_init__(self):
            if not self.eps >= 0:
                raise ValueError(f"tempo: eps must be >= 0, got {self.eps}")
            if self.std_scope not in ("group", "batch"):
                raise ValueError(f"tempo: std_scope must be 'group' or 'batch', got {self.std_scope!r}")

    def __call__(self, batch: Batch) -> None:
        p = self.params
        m = token_mask(batch)
        R, _, mean, div, live = group_baseline(batch, p.scale_by_std, p.std_scope, p.eps)   # live: non-zero rows
        gids = batch.group_ids.to(R.device)
        row = torch.where(live, (R - mean) / div, torch.zeros_like(R))   # the GRPO term, float64 [S]
        adv = broadcast_rows(row, m)                                          # float32 [S,T], 0 on padding
        r_idx, c_idx, d_val = prefix_tree_deltas(batch.response_ids, _lengths(m), gids, R, live)
        if r_idx.size:
            r = torch.from_numpy(r_idx).to(adv.device)
            c = torch.from_numpy(c_idx).to(adv.device)
            val = row[r] + p.td_coef * torch.from_numpy(d_val).to(R.device) / div[r]
            real = m[r, c]                                   # a masked position inside a response stays 0
            adv[r[real], c[real]] = val[real].to(adv.dtype)
        batch.advantages = adv
        batch.returns = adv.clone()
