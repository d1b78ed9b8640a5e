"""OPSD: On-Policy Self-Distillation (regularizer ``opsd``, advantage ``zero``).

Paper: Zhao, Xie, Liu, Huang, Pang, Chen, Grover, "Self-Distilled Reasoner" (arXiv
2601.18734); code ``siyan-zhao/OPSD`` (TRL GOLD/GKD based).  Spec B Sec. 4.

One set of weights plays two roles.  The *student* samples ``y ~ p(.|x)`` from the
ordinary prompt; the *teacher* is the same network reading a privileged context
(problem + verified solution + a transition instruction, ``teacher_template``) followed
by the student's own tokens, under ``no_grad``.  At every response position t::

    s_t = softmax(z_student_t / T)          q_t = softmax(z_teacher_t / T)   (T = sampling temperature)
    D_beta = beta KL(q || M) + (1 - beta) KL(s || M),  M = beta q + (1 - beta) s   (TRL GKD convention)
    beta = 0 -> forward KL(q || s);  beta = 1 -> reverse KL(s || q)
    clip tau_c: each vocabulary element of D is capped at tau_c *before* the vocabulary sum, zero gradient
                above it (the official ``jsd.clamp(max=token_clip)``); with a teacher far from the student
                this removes the pull towards the teacher's likely tokens (docs/methods/opd.md)
    top_k: both distributions restricted to the teacher's top-k ids and renormalised
    sampled_token: a_t = stopgrad(log q_t(y_t) - log s_t(y_t)),  loss_t = -a_t log s_t(y_t)

The per-token loss ``coef * D_t`` is returned to the trainer, which aggregates it with
the recipe's aggregation (OPSD: ``token_mean`` = sum over tokens and vocabulary / #tokens).

Memory: the student's final hidden states at the response positions come from the
trainer's forward (``needs = {"hidden"}``); the teacher pass keeps only its hidden
states [N, H].  Logits are formed ``chunk_size`` positions at a time inside an
activation-checkpointed function (as :mod:`rlkit.modeling`), so no [tokens, V] tensor
is ever held for the whole micro-batch, in the forward or the backward pass.

Alignment: the teacher input of row i is ``teacher_prompt_i + response_i[:len_i]`` built
by :func:`rlkit.modeling.build_inputs` (per-row offsets, right padding, lengths from the
response mask, never from the pad id, so pad == EOS is safe); its logits are read at
positions ``len(teacher_prompt_i) - 1 + t``.

Teacher weights (``teacher``):

* ``initial`` (default, the paper's fixed teacher): with LoRA, the base model with the
  adapters disabled (no copy); without LoRA, a frozen copy of the initial checkpoint
  (``teacher_path``, default ``model.name_or_path``).
* ``ema``: an EMA of the student (``ema_decay`` 0.999), updated once per optimizer step.
  The update is detected from the parameters' in-place version counter and applied
  before the next teacher pass (and when a checkpoint is written), so it needs no
  trainer hook; fp32 master weights; saved in the checkpoint.
* ``current``: the current weights, stop-gradient (the README warns it can be unstable).

A different model as the teacher (on-policy distillation, OPD): regularizer ``opd``
(:mod:`rlkit.algorithms.opd`); ``teacher_path`` here is checked the same way (same tokenizer; the hidden size may
differ).  ``teacher_template: null`` makes the teacher read the student's own prompt ids.

Pure distillation (OPSD proper): ``algorithm.advantage: zero`` (registered here) makes
every advantage 0, so the policy-gradient term vanishes and only this regularizer
trains; mixed with RL: keep ``grpo`` and scale this term with ``coef``.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..batch import Batch
from ..data import encode_prompt
from ..modeling import _decoder_and_head, build_inputs, chunked_logprobs
from ..plugins import AdvantageEstimator, ForwardOutput, LossInputs, Regularizer
from ..registry import register_advantage, register_regularizer

Tensor = torch.Tensor

__all__ = ["OPSD", "ZeroAdvantage", "divergence_elements", "divergence", "chunked_divergence", "sampled_token_loss",
           "fill_template", "DEFAULT_STUDENT_TEMPLATE", "DEFAULT_TEACHER_TEMPLATE"]

# Spec B 4.1 (March release wording).  The student template is for ``data.template`` (str.format, so the
# braces of \boxed{} are doubled); the teacher template uses {column} placeholders (see fill_template).
DEFAULT_STUDENT_TEMPLATE = "Problem: {prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n{solution}\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem above.\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)


# ------------------------------------------------------------------ divergences
def divergence_elements(log_s: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Per-vocabulary-element terms of the generalised JSD (sum over the last dim = D_beta).

    ``beta = 0``: q (log q - log s) (forward KL); ``beta = 1``: s (log s - log q) (reverse KL);
    otherwise beta q (log q - log M) + (1 - beta) s (log s - log M), M = beta q + (1 - beta) s."""
    q, s = log_q.exp(), log_s.exp()
    zero = torch.zeros((), dtype=log_s.dtype, device=log_s.device)
    if beta == 0.0:
        return torch.where(q > 0, q * (log_q - log_s), zero)
    if beta == 1.0:
        return torch.where(s > 0, s * (log_s - log_q), zero)
    log_m = torch.logaddexp(log_q + math.log(beta), log_s + math.log(1.0 - beta))
    return (torch.where(q > 0, beta * q * (log_q - log_m), zero)
            + torch.where(s > 0, (1.0 - beta) * s * (log_s - log_m), zero))


def _upcast(x: Tensor) -> Tensor:
    """Logits in at least fp32 (fp64 stays fp64, for gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _div_from_logits(zs: Tensor, zt: Tensor, targets: Optional[Tensor], beta: float, clip: Optional[float], top_k: int):
    """-> (loss [N] (clipped, with grad), unclipped divergence [N], clipped fraction [N],
    teacher log-prob of the target [N], student log-prob of the target [N])."""
    with torch.no_grad():
        if targets is not None:
            t_lp = torch.log_softmax(zt, -1).gather(-1, targets[:, None]).squeeze(-1)
            s_lp = torch.log_softmax(zs.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            t_lp = s_lp = zs.new_zeros(zs.shape[0])
    if top_k and top_k < zt.shape[-1]:
        ids = zt.topk(top_k, dim=-1).indices
        zs, zt = zs.gather(-1, ids), zt.gather(-1, ids)
    E = divergence_elements(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1).detach(), beta)
    div = E.detach().sum(-1)
    if clip is not None:
        frac = (E.detach() > clip).float().mean(-1)
        E = E.clamp(max=clip)  # elements above the cap are constant: no gradient through them
    else:
        frac = torch.zeros_like(div)
    return E.sum(-1), div, frac, t_lp, s_lp


def divergence(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.0, clip: Optional[float] = None,
               top_k: int = 0, temperature: float = 1.0, targets: Optional[Tensor] = None):
    """Unchunked reference: logits [N, V] -> (loss [N], divergence [N], clip fraction [N], teacher lp [N], student lp [N])."""
    zs = _upcast(student_logits) / temperature
    zt = _upcast(teacher_logits.detach()) / temperature
    return _div_from_logits(zs, zt, targets, beta, clip, top_k)


def _chunk(hs, ht, ws, bs, wt, bt, targets, temperature, beta, clip, top_k):
    zs = _upcast(F.linear(hs, ws, bs))
    with torch.no_grad():
        zt = _upcast(F.linear(ht, wt, bt))
    if temperature != 1.0:
        zs, zt = zs / temperature, zt / temperature
    return _div_from_logits(zs, zt, targets, beta, clip, top_k)


def chunked_divergence(student_hidden: Tensor, teacher_hidden: Tensor, student_weight: Tensor, teacher_weight: Tensor,
                       student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                       targets: Optional[Tensor] = None, beta: float = 0.0, clip: Optional[float] = None, top_k: int = 0,
                       temperature: float = 1.0, chunk_size: int = 1024):
    """:func:`divergence` of ``lm_head(student_hidden)`` and ``lm_head_T(teacher_hidden)`` ([N, H] each),
    ``chunk_size`` positions at a time; each chunk's logits are recomputed in the backward pass."""
    N = student_hidden.shape[0]
    outs: List[Tuple[Tensor, ...]] = []
    grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    teacher_hidden = teacher_hidden.detach()
    wt = teacher_weight.detach()
    bt = teacher_bias.detach() if teacher_bias is not None else None
    for s in range(0, N, chunk_size):
        args = (student_hidden[s:s + chunk_size], teacher_hidden[s:s + chunk_size], student_weight, student_bias, wt, bt,
                None if targets is None else targets[s:s + chunk_size], temperature, beta, clip, top_k)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    if not outs:
        z = student_hidden.new_zeros(0, dtype=torch.float32)
        return z, z, z, z, z
    return tuple(torch.cat(parts) for parts in zip(*outs))


def sampled_token_loss(student_logp: Tensor, teacher_logp: Tensor) -> Tuple[Tensor, Tensor]:
    """Sampled-token variant: a = stopgrad(log q(y) - log s(y)), loss = -a log s(y) (an unbiased
    one-sample policy-gradient estimate of reverse KL).  Returns (loss, a)."""
    a = (teacher_logp - student_logp).detach()
    return -a * student_logp, a


# ------------------------------------------------------------------ templates
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, values: Dict[str, Any]) -> str:
    """Replace ``{column}`` with ``values[column]``; ``{{``/``}}`` are literal braces and any
    other brace (``\\boxed{}``, ``\\frac{1}{2}`` with non-identifier content) is kept as is.
    An unknown ``{name}`` raises ``KeyError`` naming the available columns."""
    def rep(m):
        tok = m.group(0)
        if tok == "{{":
            return "{"
        if tok == "}}":
            return "}"
        key = m.group(1)
        if key not in values:
            raise KeyError(f"opsd: teacher_template uses {{{key}}}, which is not a column; columns: {sorted(values)}")
        v = values[key]
        return "" if v is None else str(v)

    return _PLACEHOLDER.sub(rep, template)


# ------------------------------------------------------------------ plugins
@register_advantage("zero")
class ZeroAdvantage(AdvantageEstimator):
    """Every advantage is 0: no policy-gradient term (pure distillation with a regularizer such as ``opsd``)."""

    def __call__(self, batch: Batch) -> None:
        batch.advantages = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        batch.returns = batch.advantages.clone()


@register_regularizer("opsd")
class OPSD(Regularizer):
    """On-policy self-distillation loss (see the module docstring)."""

    name = "opsd"      # error messages
    prefix = "opsd"    # metric names

    @dataclass
    class Params:
        coef: float = 1.0
        loss: Literal["full", "top_k", "sampled_token"] = "full"
        beta: float = 0.0                       # 0 forward KL (Mar-18 release), 1 reverse KL, else JSD (March: 0.5)
        clip: Optional[float] = None            # point-wise cap tau_c per vocabulary element (Mar-18: 0.05); null = off
        top_k: int = 50                         # loss: top_k
        teacher: Literal["initial", "ema", "current"] = "initial"
        ema_decay: float = 0.999
        teacher_path: Optional[str] = None      # initial teacher checkpoint (default model.name_or_path; not with LoRA)
        teacher_template: Optional[str] = DEFAULT_TEACHER_TEMPLATE   # null: the student's own prompt ids
        chat_template: Optional[bool] = None    # default data.chat_template
        system_prompt: Optional[str] = None     # default data.system_prompt
        teacher_suffix: str = ""                # text appended after the (chat-formatted) teacher prompt, e.g. "<think>\n"
        chunk_size: Optional[int] = None        # positions per logits chunk (default trainer.logprob_chunk_size)
        teacher_micro_batch: int = 0            # rows per teacher forward (0 = the whole micro-batch)

        def __post_init__(self):
            if not 0.0 <= self.beta <= 1.0:
                raise ValueError(f"opsd: beta must be in [0, 1], got {self.beta}")
            if self.loss == "top_k" and self.top_k < 1:
                raise ValueError(f"opsd: top_k must be >= 1 with loss: top_k, got {self.top_k}")
            if not 0.0 < self.ema_decay < 1.0:
                raise ValueError(f"opsd: ema_decay must be in (0, 1), got {self.ema_decay}")
            if self.loss == "sampled_token" and self.clip is not None:
                raise ValueError("opsd: clip applies to the full / top_k divergence, not to loss: sampled_token")

    @staticmethod
    def check_config(cfg, params, key: str) -> None:
        """A separate teacher (``teacher_path``) must share the student's tokenizer; checked before any model loads."""
        if params.teacher_path is not None:
            from .opd import check_teacher_vocabulary

            check_teacher_vocabulary(cfg, params.teacher_path, f"{key}.teacher_path")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.needs = frozenset() if self.params.loss == "sampled_token" else frozenset({"hidden"})
        self._prompt_cache: Dict[str, List[int]] = {}
        self._frozen: Optional[torch.nn.Module] = None     # initial teacher copy (no LoRA)
        self._ema: Optional[torch.nn.Module] = None
        self._ema_pairs: List[Tuple[str, Tensor, Tensor, Optional[Tensor]]] = []   # (name, student p, teacher p, fp32 master)
        self._ema_version: Optional[int] = None
        self._ema_steps = 0
        self._pending_ema: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------ config helpers
    def _chunk_size(self) -> int:
        return int(self.params.chunk_size or self.config_value("trainer", "logprob_chunk_size", default=1024))

    # ------------------------------------------------------------ teacher prompts
    def teacher_prompt_ids(self, batch: Batch) -> List[List[int]]:
        """Token ids of every row's teacher prompt (cached by text); ``teacher_template: null`` = the student's own
        prompt ids (OPD: the teacher reads what the student read)."""
        p = self.params
        if p.teacher_template is None:
            return [list(x) for x in batch.prompt_ids]
        tok = self.ctx.tokenizer
        if tok is None:
            raise ValueError("opsd: no tokenizer in the plugin context")
        chat = p.chat_template if p.chat_template is not None else bool(self.config_value("data", "chat_template", default=False))
        system = p.system_prompt if p.system_prompt is not None else self.config_value("data", "system_prompt")
        pf = self.config_value("data", "prompt_field", default="question")
        out = []
        for i in range(len(batch)):
            cols = {k: v[i] for k, v in batch.info.items()}
            if "problem" not in cols and pf in cols:
                cols["problem"] = cols[pf]
            text = fill_template(p.teacher_template, cols)
            ids = self._prompt_cache.get(text)
            if ids is None:
                ids = encode_prompt(tok, text, chat, system)
                if p.teacher_suffix:
                    ids = ids + list(tok(p.teacher_suffix, add_special_tokens=False)["input_ids"])
                if len(self._prompt_cache) > 200_000:
                    self._prompt_cache.clear()
                self._prompt_cache[text] = ids
            out.append(ids)
        return out

    # ------------------------------------------------------------ teacher weights
    @staticmethod
    def _is_peft(model) -> bool:
        return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")

    @contextlib.contextmanager
    def _teacher(self, model):
        p = self.params
        if p.teacher == "current":
            yield model
        elif p.teacher == "ema":
            yield self._ema_model(model)
        elif self._is_peft(model) and p.teacher_path is None:
            with model.disable_adapter():  # the base weights = the initial policy
                yield model
        else:
            if self._frozen is None:
                self._frozen = self._load_initial(model)
            yield self._frozen

    def _load_initial(self, model):
        path = self.params.teacher_path or self.config_value("model", "name_or_path")
        if self.params.teacher_path and self.ctx is not None and self.ctx.config is not None:
            from .opd import check_teacher_vocabulary, regularizer_key   # a hub teacher: not checked at config time

            check_teacher_vocabulary(self.ctx.config, self.params.teacher_path,
                                     regularizer_key(self.ctx.config, self.name, self.params.teacher_path), offline=False)
        if path:
            from ..modeling import load_causal_lm

            dev = next(model.parameters()).device
            with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):  # keep the RNG streams
                m = load_causal_lm(path, self.config_value("model", "dtype", default="float32"),
                                   bool(self.config_value("model", "trust_remote_code", default=False)), self.config_value("model", "attn_implementation"))
        else:  # no config (unit tests): the weights as they are at the first call = the initial policy
            m = copy.deepcopy(model)
        dev = next(model.parameters()).device
        return m.to(dev).requires_grad_(False).eval()

    def _ema_model(self, model):
        if self._ema is None:
            ema = copy.deepcopy(model).requires_grad_(False).eval()
            tp = dict(ema.named_parameters())
            self._ema_pairs = []
            for name, q in model.named_parameters():
                if q.requires_grad:
                    e = tp[name]
                    master = q.detach().float().clone() if e.dtype != torch.float32 else None
                    self._ema_pairs.append((name, q, e, master))
            if not self._ema_pairs:
                raise ValueError("opsd: teacher ema needs trainable parameters")
            self._ema = ema
            if self._pending_ema is not None:  # resumed: the saved EMA already includes every optimizer step
                saved, self._pending_ema = self._pending_ema, None
                with torch.no_grad():
                    for name, _, e, master in self._ema_pairs:
                        t = saved[name].to(e.device)
                        if master is not None:
                            master.copy_(t)
                        e.copy_(t.to(e.dtype))
            self._ema_version = self._version()
        else:
            self._maybe_update_ema()
        return self._ema

    def _version(self) -> int:
        return sum(int(q._version) for _, q, _, _ in self._ema_pairs[:1])

    def _maybe_update_ema(self) -> None:
        """One EMA step per optimizer step: the optimizer's in-place update bumps the version counter."""
        if self._ema is None or self._ema_version is None:
            return
        v = self._version()
        if v == self._ema_version:
            return
        d = self.params.ema_decay
        with torch.no_grad():
            for _, q, e, master in self._ema_pairs:
                if master is not None:
                    master.mul_(d).add_(q.detach().float(), alpha=1.0 - d)
                    e.copy_(master.to(e.dtype))
                else:
                    e.mul_(d).add_(q.detach().to(e.dtype), alpha=1.0 - d)
        self._ema_steps += 1
        self._ema_version = v

    # ------------------------------------------------------------ teacher pass
    @torch.no_grad()
    def _teacher_hidden(self, model, batch: Batch, prompts: List[List[int]], pad_id: int):
        """Teacher final hidden states [N, H] at the response positions, their (row, response
        position) indices (row-major over real tokens, exactly as the trainer's build_inputs),
        and the teacher's output projection (weight, bias)."""
        S = len(batch)
        step = self.params.teacher_micro_batch or S
        hs_parts, r_parts, c_parts = [], [], []
        with self._teacher(model) as tm:
            decoder, head = _decoder_and_head(tm)
            dev = next(tm.parameters()).device
            for s in range(0, S, step):
                part = list(range(s, min(S, s + step)))
                ids, att, (r, pred, c) = build_inputs([prompts[i] for i in part], batch.response_ids[part],
                                                      batch.response_mask[part], pad_id)
                out = decoder(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False)
                hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hs_parts.append(hs[r.to(dev), pred.to(dev)])
                r_parts.append(r + s)
                c_parts.append(c)
            weight = head.weight.detach()
            bias = getattr(head, "bias", None)
            bias = bias.detach() if bias is not None else None
        return torch.cat(hs_parts), torch.cat(r_parts), torch.cat(c_parts), weight, bias

    # ------------------------------------------------------------ the loss
    def __call__(self, inp: LossInputs, fwd: ForwardOutput, batch: Batch) -> Tuple[Tensor, Dict[str, Any]]:
        p = self.params
        zeros = torch.zeros_like(inp.logprobs)
        if not bool((batch.response_mask > 0).any()) or not bool((inp.mask > 0).any()):
            return zeros, {}  # a zero-weight dummy micro-batch (distributed padding): no teacher pass
        model = fwd.model
        if model is None:
            raise ValueError("opsd: the trainer's ForwardOutput has no model for the teacher pass")
        if p.teacher == "ema":
            self._maybe_update_ema()
        pad_id = self.ctx.tokenizer.pad_token_id if self.ctx.tokenizer is not None and self.ctx.tokenizer.pad_token_id is not None else 0
        prompts = self.teacher_prompt_ids(batch)
        dev = inp.logprobs.device
        mask = batch.response_mask.to(dev) > 0  # real tokens (never the pad id: pad may equal EOS)
        ht, rows, cols, wt, bt = self._teacher_hidden(model, batch, prompts, pad_id)
        rows, cols = rows.to(dev), cols.to(dev)
        targets = batch.response_ids.to(dev)[rows, cols]
        T = float(fwd.temperature) if not isinstance(fwd.temperature, torch.Tensor) else fwd.temperature
        metrics: Dict[str, Any] = {}
        P = self.prefix
        if p.loss == "sampled_token":
            t_lp, _ = chunked_logprobs(ht.to(dev), _Head(wt, bt), targets, T, False, self._chunk_size())
            teacher_lp = zeros.detach().clone().index_put((rows, cols), t_lp.float())
            loss, a = sampled_token_loss(inp.logprobs, teacher_lp)
            loss = torch.where(mask, loss, zeros)
            div = torch.where(mask, -a, zeros.detach())
            metrics.update({f"{P}/teacher_logp": torch.where(mask, teacher_lp, zeros.detach()),
                            f"{P}/student_logp": torch.where(mask, inp.logprobs.detach(), zeros.detach())})
        else:
            if fwd.hidden is None or fwd.lm_head is None:
                raise ValueError("opsd: needs the student's hidden states and LM head (needs={'hidden'})")
            hs = fwd.hidden[rows, cols]
            head = fwd.lm_head
            ws, bs = head.weight, getattr(head, "bias", None)
            # the hidden sizes may differ (a larger teacher); the vocabularies must not.  Output widths that differ
            # only by padding rows beyond the tokenizer (e.g. 151936 vs 152064 in one model family) are cut to
            # the common width: those ids are never sampled.
            if ws.shape[0] != wt.shape[0]:
                n_tok = len(self.ctx.tokenizer) if self.ctx.tokenizer is not None else None
                V = min(ws.shape[0], wt.shape[0])
                if n_tok is None or V < n_tok:
                    raise ValueError(f"{self.name}: teacher and student vocabularies differ ({wt.shape[0]} vs {ws.shape[0]} "
                                     f"output rows, tokenizer {n_tok})")
                ws, wt = ws[:V], wt[:V]
                bs = None if bs is None else bs[:V]
                bt = None if bt is None else bt[:V]
            l, d, frac, t_lp, s_lp = chunked_divergence(
                hs, ht.to(hs.device), ws, wt.to(hs.device), bs,
                None if bt is None else bt.to(hs.device), targets=targets, beta=p.beta, clip=p.clip,
                top_k=p.top_k if p.loss == "top_k" else 0, temperature=T, chunk_size=self._chunk_size())
            base = torch.zeros(inp.logprobs.shape, dtype=l.dtype, device=dev)
            loss = base.index_put((rows, cols), l)
            div = base.detach().index_put((rows, cols), d)
            metrics.update({f"{P}/teacher_logp": base.detach().index_put((rows, cols), t_lp),
                            f"{P}/student_logp": base.detach().index_put((rows, cols), s_lp)})
            if p.clip is not None:
                metrics[f"{P}/clip_frac"] = base.detach().index_put((rows, cols), frac)
        metrics[f"{P}/loss"] = loss.detach()
        metrics[f"{P}/div"] = div
        metrics[f"{P}/teacher_prompt_len"] = float(sum(len(x) for x in prompts) / max(len(prompts), 1))
        if p.teacher == "ema":
            metrics[f"{P}/ema_steps"] = float(self._ema_steps)
        return p.coef * loss, metrics

    # ------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        if self.params.teacher != "ema":
            return {}
        if self._ema is None:
            return {"ema": self._pending_ema, "ema_steps": self._ema_steps} if self._pending_ema is not None else {}
        self._maybe_update_ema()  # an optimizer step taken since the last teacher pass belongs in the checkpoint
        return {"ema": {name: (master if master is not None else e).detach().float().cpu().clone()
                        for name, _, e, master in self._ema_pairs},
                "ema_steps": self._ema_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.params.teacher != "ema" or not state or state.get("ema") is None:
            return
        self._ema_steps = int(state.get("ema_steps", 0))
        self._pending_ema = dict(state["ema"])
        self._ema, self._ema_pairs, self._ema_version = None, [], None  # rebuilt from the current weights at the next call


class _Head:
    """A weight/bias pair with the ``lm_head`` interface :func:`chunked_logprobs` expects."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight, self.bias = weight, bias
