"""PCL: Prompt Curriculum Learning (prompt selector ``pcl``).

Paper: Gao, Kim, Sun, Joachims, Wang, Pang, Tan, "Prompt Curriculum Learning for
Efficient LLM Post-Training", arXiv 2510.01135 (ICLR 2026).  No public code; this
follows spec A Sec. 4 (``../shared/specs/credit_and_sampling.md``) and
``confirmations.md`` Sec. 2.

A value model ``V(x)`` reads the prompt only and predicts the current policy's
success rate ``p(x) = E_y[r(x, y)]``.  Every step::

    pool   = k*m prompts drawn uniformly, without replacement within the draw
    v      = V(pool)                                   (one forward pass, no generation)
    chosen = the m prompts with the smallest |v - tau|  (ties -> lower pool position)
    ... rollouts, policy update (the trainer) ...
    update(batch): one MSE step of V on the chosen prompts' empirical mean rewards
                   (the rollouts already made for the policy: no extra generation)

Two value models (``mode``):

* ``separate``: its own transformer backbone (``model_path``; default the policy's
  ``model.name_or_path``) + an MLP head, all trained.  With a different checkpoint
  the prompt text is re-tokenized with that checkpoint's tokenizer.
* ``frozen_base``: a frozen copy of the policy's base checkpoint + the MLP head;
  only the head trains, so prompt features are computed once and cached.

The head is ``LayerNorm -> Linear(H, h) -> tanh -> Linear(h, 1)`` on the last prompt
token's hidden state (``pooling: last``; or the mean over prompt tokens), followed by a
sigmoid (``output: sigmoid``; ``linear`` for rewards outside [0, 1]).  Its last
layer starts at zero with the bias set so that every prompt predicts ``tau``: the
first step is uniform sampling, and the curriculum forms as the value model learns.
Prompts are identified by their stable ``row_id`` (``Batch.info``), never by their text (a controller
may rewrite the text after ``bind``).
[INFERRED] (unconfirmed in the sources): MLP width, sigmoid, lrs, last-token pooling,
mean-reduced MSE (the sources write the sum; ``loss_reduction: sum``), one update per
step, fresh uniform pool every step.

Distributed: ``select`` runs on every rank; every rank computes the same pool (the
RNG is a function of the seed and a draw counter) and rank 0's choice is broadcast.
``update`` gathers each rank's (prompt, reward sum, count) with
``accelerate.utils.gather_object``, so every rank makes the identical value-model
update on the global batch and the copies never drift apart.

Metrics (``pcl/...``): ``explained_variance`` (of the pre-update predictions on the
selected prompts vs. their empirical success), ``value_loss``, ``selected_pred``
and ``selected_empirical`` (mean predicted / empirical success of the selected
prompts = their difficulty), ``selected_dist_to_tau``, ``pool_pred_mean``,
``pool_pred_std``, ``predict_time_s``, ``update_time_s``, ``num_prompts``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..batch import Batch
from ..data import encode_prompt
from ..plugins import PromptSelector
from ..registry import register_prompt_selector

__all__ = ["PCLSelector", "PromptValueModel", "select_closest", "value_loss", "explained_variance"]


# ------------------------------------------------------------ pure helpers
def select_closest(values: Sequence[float] | torch.Tensor, m: int, tau: float = 0.5, decimals: int = 6) -> List[int]:
    """Positions of the ``m`` values closest to ``tau``, closest first; equal distances
    (after rounding to ``decimals``) go to the lower position."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    d = (v - tau).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    key = torch.round(d * 10 ** decimals)
    order = torch.sort(key, stable=True).indices
    return order[:m].tolist()


def value_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``sum_i (V(x_i) - mean_j r_ij)^2`` (``sum``) or its mean over prompts (``mean``)."""
    se = (pred - target) ** 2
    return se.sum() if reduction == "sum" else se.mean()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - pred) / Var(target)``; NaN when the targets are constant."""
    pred, target = pred.detach().double().flatten(), target.detach().double().flatten()
    if target.numel() < 2:
        return math.nan
    var = target.var(unbiased=False)
    if var <= 0:
        return math.nan
    return float(1.0 - (target - pred).var(unbiased=False) / var)


# ------------------------------------------------------------ value model
class PromptValueModel(nn.Module):
    """Backbone (HF ``AutoModel``) + MLP head -> one scalar per prompt."""

    def __init__(self, backbone: nn.Module, head_hidden: Optional[int] = None, output: str = "sigmoid",
                 pooling: str = "last", init_value: float = 0.5):
        super().__init__()
        self.backbone = backbone
        H = int(backbone.config.hidden_size)
        h = int(head_hidden or H)
        # LayerNorm first: backbone features can be large (final-norm gains), which would saturate tanh
        self.head = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, h), nn.Tanh(), nn.Linear(h, 1))
        out = self.head[-1]
        nn.init.zeros_(out.weight)
        if output == "sigmoid":
            p = min(max(init_value, 1e-4), 1 - 1e-4)
            nn.init.constant_(out.bias, math.log(p / (1 - p)))
        else:
            nn.init.constant_(out.bias, init_value)
        self.output = output
        self.pooling = pooling

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.pooling == "mean":
            m = attention_mask.to(hs.dtype).unsqueeze(-1)
            return ((hs * m).sum(1) / m.sum(1).clamp(min=1)).float()
        last = attention_mask.long().sum(-1).clamp(min=1) - 1
        return hs[torch.arange(hs.shape[0], device=hs.device), last].float()

    def head_forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = self.head(feats.float()).squeeze(-1)
        return torch.sigmoid(z) if self.output == "sigmoid" else z

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.features(input_ids, attention_mask))


@contextlib.contextmanager
def _private_rng(device, seed: int):
    """Run a block with its own seeded RNG; the global CPU (and current CUDA) RNG states are restored after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _to_cpu(obj):
    """A detached CPU copy of nested optimizer state (never aliases the live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            att[i, :len(s)] = 1
    return ids.to(device), att.to(device)


# ------------------------------------------------------------ the selector
@register_prompt_selector("pcl")
class PCLSelector(PromptSelector):
    """Value-model prompt curriculum (PCL).  See the module docstring."""

    @dataclass
    class Params:
        mode: Literal["separate", "frozen_base"] = "separate"
        model_path: Optional[str] = None        # separate: value backbone checkpoint (default: model.name_or_path)
        k: int = 4                              # pool = k x (prompts the trainer asks for)
        tau: float = 0.5                        # target success rate
        lr: Optional[float] = None              # backbone lr (separate); default trainer.lr
        head_lr: float = 1e-3                   # MLP head lr
        weight_decay: float = 0.0
        head_hidden: Optional[int] = None       # MLP width; default the backbone's hidden size
        output: Literal["sigmoid", "linear"] = "sigmoid"
        pooling: Literal["last", "mean"] = "last"
        loss_reduction: Literal["mean", "sum"] = "mean"
        updates_per_step: int = 1               # optimizer steps of V per RL step (on the same batch)
        micro_batch_size: int = 16              # prompts per value-model forward
        max_grad_norm: float = 1.0              # 0 = no clipping
        dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None   # default model.dtype
        gradient_checkpointing: bool = False
        reward_key: Optional[str] = None        # reward component used as the target (default: the total reward)
        cache_features: bool = True             # frozen_base: keep each prompt's (frozen) features
        tie_decimals: int = 6                   # |v - tau| equal after rounding = a tie (lower pool position wins)

        def __post_init__(self):
            if self.k < 1:
                raise ValueError(f"pcl: k must be >= 1, got {self.k}")
            if self.micro_batch_size < 1 or self.updates_per_step < 0:
                raise ValueError("pcl: micro_batch_size must be >= 1 and updates_per_step >= 0")
            if self.mode == "frozen_base" and self.model_path is not None:
                raise ValueError("pcl: mode frozen_base uses the policy's own checkpoint; leave model_path unset "
                                 "(or use mode: separate)")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.draws = 0
        self.vm: Optional[PromptValueModel] = None
        self.opt: Optional[torch.optim.Optimizer] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._ids_cache: Dict[int, List[int]] = {}
        self._feat_cache: Dict[int, torch.Tensor] = {}
        self._sel: Dict[int, float] = {}         # dataset index -> prediction at selection time (this step)
        self._sel_metrics: Dict[str, float] = {}
        self._by_ids: Dict[Tuple[int, ...], int] = {}

    # ------------------------------------------------------------ setup
    def bind(self, dataset) -> None:
        super().bind(dataset)
        self._by_ids = {}
        for i, r in enumerate(dataset):
            if "row_id" in r and int(r["row_id"]) != i:
                raise ValueError(f"pcl: dataset row {i} has row_id {r['row_id']}: row ids must be the row positions")
            if "prompt_ids" in r:
                self._by_ids.setdefault(tuple(r["prompt_ids"]), i)


    @property
    def device(self):
        return torch.device(self.ctx.device) if self.ctx.device is not None else torch.device("cpu")

    def _policy_path(self) -> str:
        path = self.config_value("model", "name_or_path")
        if not path:
            raise ValueError("pcl: no model path: set algorithm.prompt_selector.model_path (or model.name_or_path)")
        return path

    def build_value_model(self, backbone: Optional[nn.Module] = None, tokenizer=None) -> PromptValueModel:
        """Load (or take) the backbone, build the head and the optimizer."""
        p = self.params
        from ..modeling import load_backbone, load_tokenizer

        own_path = p.model_path if p.mode == "separate" else None
        self._own_tokenizer = None
        # built lazily (first select, or after a resume): never touch the global RNG streams, which the
        # trainer checkpoints, and initialise the head from the seed alone, so a resumed run matches
        with _private_rng(self.device, int(self.ctx.seed) + 7_777):
            if backbone is None:
                path = own_path or self._policy_path()
                dtype = p.dtype or self.config_value("model", "dtype", default="float32")
                backbone = load_backbone(path, dtype, bool(self.config_value("model", "trust_remote_code", default=False)))
            vm = PromptValueModel(backbone, p.head_hidden, p.output, p.pooling, init_value=p.tau)
        if tokenizer is not None:
            self._own_tokenizer = tokenizer
        elif own_path and own_path != self.config_value("model", "name_or_path"):
            self._own_tokenizer = load_tokenizer(own_path, bool(self.config_value("model", "trust_remote_code", default=False)))
        vm.head.to(self.device, torch.float32)
        vm.backbone.to(self.device)
        if p.mode == "frozen_base":
            vm.backbone.requires_grad_(False).eval()
            groups = [{"params": list(vm.head.parameters()), "lr": p.head_lr}]
        else:
            if p.gradient_checkpointing and hasattr(vm.backbone, "gradient_checkpointing_enable"):
                vm.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lr = p.lr if p.lr is not None else float(self.config_value("trainer", "lr", default=1e-6))
            groups = [{"params": [q for q in vm.backbone.parameters() if q.requires_grad], "lr": lr},
                      {"params": list(vm.head.parameters()), "lr": p.head_lr}]
        vm.eval()  # train mode only inside `update` (separate mode)
        self.vm = vm
        self.opt = torch.optim.AdamW(groups, weight_decay=p.weight_decay)
        self._pad_id = self._pad_id_of(self._own_tokenizer or self.ctx.tokenizer)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_model_state(state)
        return vm

    @staticmethod
    def _pad_id_of(tok) -> int:
        if tok is None:
            return 0
        for a in ("pad_token_id", "eos_token_id"):
            v = getattr(tok, a, None)
            if v is not None:
                return int(v)
        return 0

    def _ensure(self) -> PromptValueModel:
        if self.vm is None:
            self.build_value_model()
        return self.vm

    # ------------------------------------------------------------ inputs
    def _prompt_ids(self, i: int) -> List[int]:
        ids = self._ids_cache.get(i)
        if ids is None:
            row = self.dataset[i]
            if self._own_tokenizer is not None:
                ids = encode_prompt(self._own_tokenizer, row["prompt"], bool(self.config_value("data", "chat_template", default=False)),
                                    self.config_value("data", "system_prompt"))
            elif "prompt_ids" in row:
                ids = list(row["prompt_ids"])
            else:
                ids = encode_prompt(self.ctx.tokenizer, row["prompt"], bool(self.config_value("data", "chat_template", default=False)),
                                    self.config_value("data", "system_prompt"))
            self._ids_cache[i] = ids
        return ids

    def _features(self, idx: Sequence[int]) -> torch.Tensor:
        """frozen_base: features of rows ``idx`` from the frozen backbone (cached per row)."""
        vm, mb = self.vm, self.params.micro_batch_size
        cache = self._feat_cache if self.params.cache_features else {}
        todo = [i for i in dict.fromkeys(idx) if i not in cache]
        with torch.no_grad():
            for s in range(0, len(todo), mb):
                part = todo[s:s + mb]
                f = vm.features(*_pad([self._prompt_ids(i) for i in part], self._pad_id, self.device))
                for i, row in zip(part, f.cpu()):
                    cache[i] = row  # on the CPU: the cache can hold a whole dataset
        return torch.stack([cache[i] for i in idx]).to(self.device)

    def _iter_pred(self, idx: Sequence[int]):
        """(start, predictions) per micro-batch of rows ``idx``; with grad where the module trains."""
        mb = self.params.micro_batch_size
        if self.params.mode == "frozen_base":
            feats = self._features(idx)
            for s in range(0, len(idx), mb):
                yield s, self.vm.head_forward(feats[s:s + mb])
        else:
            for s in range(0, len(idx), mb):
                yield s, self.vm(*_pad([self._prompt_ids(i) for i in idx[s:s + mb]], self._pad_id, self.device))

    def predict(self, idx: Sequence[int]) -> torch.Tensor:
        """Predicted success rate of dataset rows ``idx`` (float32, on CPU), no grad."""
        vm = self._ensure()
        if not len(idx):
            return torch.zeros(0)
        was = vm.training
        vm.eval()
        with torch.no_grad():
            out = torch.cat([v.float().cpu() for _, v in self._iter_pred(list(idx))])
        vm.train(was)
        return out

    # ------------------------------------------------------------ select
    def _draw_pool(self, size: int) -> List[int]:
        g = torch.Generator().manual_seed(int(self.ctx.seed) * 1_000_003 + 7919 * self.draws + 17)
        self.draws += 1
        return torch.randperm(len(self.dataset), generator=g)[:size].tolist()

    def select(self, step: int, n: int) -> List[int]:
        p = self.params
        N = len(self.dataset)
        pool = self._draw_pool(min(p.k * n, N))
        t0 = time.perf_counter()
        v = self.predict(pool)
        t_pred = time.perf_counter() - t0
        pos = select_closest(v, min(n, len(pool)), p.tau, p.tie_decimals)
        while len(pos) < n:  # dataset smaller than the batch: repeat the ranking
            pos += select_closest(v, min(n - len(pos), len(pool)), p.tau, p.tie_decimals)
        if self.ctx.world_size > 1:  # identical on every rank by construction; make it certain
            from accelerate.utils import broadcast_object_list

            box = [pos]
            broadcast_object_list(box, from_process=0)
            pos = box[0]
        chosen = [pool[j] for j in pos]
        sel_v = v[pos]
        self._sel.update({i: float(v[j]) for i, j in zip(chosen, pos)})
        self._sel_metrics = {
            "pcl/pool_pred_mean": float(v.mean()) if len(v) else math.nan,
            "pcl/pool_pred_std": float(v.std()) if len(v) > 1 else 0.0,
            "pcl/selected_dist_to_tau": float((sel_v - p.tau).abs().mean()) if len(sel_v) else math.nan,
            "pcl/predict_time_s": t_pred,
            "pcl/pool_size": float(len(pool)),
        }
        return chosen

    # ------------------------------------------------------------ update
    def _row_index(self, batch: Batch, r: int) -> Optional[int]:
        """The dataset row of batch row ``r``: its stable ``row_id`` (``rlkit.data.tokenize_rows``), never the
        prompt text, which a controller may rewrite after ``bind`` (length_budget's ``prompt_template``).
        Batches without ``row_id`` (hand-built) fall back to the prompt ids as bound."""
        ids = batch.info.get("row_id")
        if ids is not None and ids[r] is not None:
            i = int(ids[r])
            return i if 0 <= i < len(self.dataset) else None
        return self._by_ids.get(tuple(batch.prompt_ids[r]))

    def _targets(self, batch: Batch) -> Dict[int, Tuple[float, float]]:
        """dataset index -> (reward sum, count) over this rank's rollouts."""
        out: Dict[int, Tuple[float, float]] = {}
        if batch is None or len(batch) == 0:
            return out
        key = self.params.reward_key
        if key is not None:
            if key not in batch.reward_components:
                raise KeyError(f"pcl: reward_key {key!r} is not a reward component; have {sorted(batch.reward_components)}")
            r = batch.reward_components[key]
        else:
            r = batch.rewards
        if r is None:
            return out
        r = r.detach().float().cpu()
        self._unmatched = 0
        for row in range(len(batch)):
            x = float(r[row])
            if math.isnan(x):
                continue
            i = self._row_index(batch, row)
            if i is None:
                self._unmatched += 1
                continue
            s, c = out.get(i, (0.0, 0.0))
            out[i] = (s + x, c + 1.0)
        return out

    def _gather(self, local: Dict[int, Tuple[float, float]]) -> Dict[int, Tuple[float, float]]:
        if self.ctx.world_size <= 1:
            return local
        from accelerate.utils import gather_object

        merged: Dict[int, Tuple[float, float]] = {}
        for i, s, c in gather_object([(i, s, c) for i, (s, c) in sorted(local.items())]):
            s0, c0 = merged.get(i, (0.0, 0.0))
            merged[i] = (s0 + s, c0 + c)
        return merged

    def update(self, batch: Batch) -> Dict[str, float]:
        p = self.params
        t0 = time.perf_counter()
        self._unmatched = 0
        stats = self._gather(self._targets(batch))
        metrics = dict(self._sel_metrics)
        if self._unmatched:  # rows the value model cannot learn from: say so rather than silently not learn
            metrics["pcl/unmatched_rows"] = float(self._unmatched)
        sel, self._sel, self._sel_metrics = self._sel, {}, {}
        if not stats:
            return metrics
        vm = self._ensure()
        idx = sorted(stats)
        target = torch.tensor([stats[i][0] / stats[i][1] for i in idx], dtype=torch.float32, device=self.device)
        params = [q for g in self.opt.param_groups for q in g["params"]]
        if p.mode == "separate":
            vm.train()  # (dropout is off in rlkit-loaded models; train mode lets gradient checkpointing act)
        pre = None
        for _ in range(max(p.updates_per_step, 1)):
            self.opt.zero_grad(set_to_none=True)
            preds = []
            with torch.set_grad_enabled(p.updates_per_step > 0):
                for s, v in self._iter_pred(idx):
                    loss = ((v.float() - target[s:s + len(v)]) ** 2).sum()
                    if p.loss_reduction == "mean":
                        loss = loss / len(idx)
                    if p.updates_per_step > 0:
                        loss.backward()
                    preds.append(v.detach())
            if pre is None:
                pre = torch.cat(preds)
            if p.updates_per_step == 0:
                break
            if p.max_grad_norm and p.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        vm.eval()
        pre_c, tgt_c = pre.float().cpu(), target.cpu()
        metrics.update({
            "pcl/value_loss": float(value_loss(pre_c, tgt_c, "mean")),
            "pcl/explained_variance": explained_variance(pre_c, tgt_c),
            "pcl/selected_pred": float(pre_c.mean()),
            "pcl/selected_empirical": float(tgt_c.mean()),
            "pcl/empirical_dist_to_tau": float((tgt_c - p.tau).abs().mean()),
            "pcl/num_prompts": float(len(idx)),
            "pcl/update_time_s": time.perf_counter() - t0,
        })
        if sel:  # predictions made at selection time (same weights as `pre` unless refills re-selected)
            sv = [sel[i] for i in idx if i in sel]
            if sv:
                metrics["pcl/selected_pred_at_select"] = float(sum(sv) / len(sv))
        return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}

    # ------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        st: Dict[str, Any] = {"draws": self.draws}
        if self.vm is not None:
            st["head"] = {k: v.detach().cpu().clone() for k, v in self.vm.head.state_dict().items()}
            if self.params.mode == "separate":
                st["backbone"] = {k: v.detach().cpu().clone() for k, v in self.vm.backbone.state_dict().items()}
            st["optimizer"] = _to_cpu(self.opt.state_dict())
        elif self._pending_state is not None:
            st.update({k: v for k, v in self._pending_state.items() if k != "draws"})
        return st

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.draws = int(state.get("draws", 0))
        self._feat_cache = {}
        if "head" not in state:
            return
        if self.vm is None:
            self._pending_state = dict(state)  # applied when the value model is built
        else:
            self._load_model_state(state)

    def _load_model_state(self, state: Dict[str, Any]) -> None:
        self.vm.head.load_state_dict(state["head"])
        if "backbone" in state and self.params.mode == "separate":
            self.vm.backbone.load_state_dict(state["backbone"])
        if "optimizer" in state:
            self.opt.load_state_dict(state["optimizer"])
