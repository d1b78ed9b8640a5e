"""Policy / value / reference wrappers with chunked log-probs.

``PolicyModule.forward`` runs the decoder once, takes the hidden states at the
positions that predict response tokens (only the real ones, padding is never
projected), and projects them through the LM head in chunks of
``chunk_size`` positions.  Each chunk's ``[chunk, V]`` logits are recomputed
in the backward pass (activation checkpointing) instead of being stored, so
no ``[S, T, V]`` tensor, fp32 or otherwise, ever exists.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def build_inputs(prompt_ids: Sequence[Sequence[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, pad_id: int):
    """Right-padded ``prompt + response`` sequences and, for every real response
    token, the flat index of the position that predicts it.  A response with masked holes (multi-turn
    observation tokens) is fed up to its last real token; the holes are context only (no index)."""
    S, T = response_ids.shape
    lens_p = [len(p) for p in prompt_ids]
    m = (response_mask > 0).cpu()
    pos = torch.arange(1, T + 1).expand(S, T) if T else torch.zeros(S, 0, dtype=torch.long)
    lens_r = (torch.where(m, pos, torch.zeros_like(pos)).max(-1).values if T else torch.zeros(S, dtype=torch.long)).tolist()
    holes = bool((m.sum(-1) != torch.as_tensor(lens_r)).any()) if S else False
    L = max(lp + lr for lp, lr in zip(lens_p, lens_r)) if S else 1
    L = max(L, 1)
    ids = torch.full((S, L), pad_id, dtype=torch.long)
    att = torch.zeros((S, L), dtype=torch.long)
    rows, cols_pred, cols_resp = [], [], []
    for i in range(S):
        lp, lr = lens_p[i], lens_r[i]
        ids[i, :lp] = torch.as_tensor(prompt_ids[i], dtype=torch.long)
        ids[i, lp:lp + lr] = response_ids[i, :lr]
        att[i, :lp + lr] = 1
        if holes:
            real = m[i, :lr].nonzero().flatten().tolist()
            rows += [i] * len(real)
            cols_pred += [lp - 1 + t for t in real]
            cols_resp += real
            continue
        rows += [i] * lr
        cols_pred += list(range(lp - 1, lp - 1 + lr))
        cols_resp += list(range(lr))
    idx = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols_pred, dtype=torch.long), torch.tensor(cols_resp, dtype=torch.long))
    return ids, att, idx


def _chunk_logp_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                        temperature: float, need_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight, bias).float()
    if isinstance(temperature, torch.Tensor):      # one temperature per position [N]
        logits = logits / temperature[:, None].to(logits)
    elif temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if need_entropy:
        p = torch.softmax(logits, dim=-1)
        ent = logz - (p * logits).sum(-1)
    else:
        ent = torch.zeros_like(logp)
    return logp, ent


def chunked_logprobs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                     need_entropy: bool = False, chunk_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` [N] and entropy under ``softmax(lm_head(hidden)/T)``; hidden is [N, H].
    ``temperature`` is a float or a [N] tensor (one temperature per position)."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    outs_lp, outs_ent = [], []
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for s in range(0, hidden.shape[0], chunk_size):
        h = hidden[s:s + chunk_size]
        t = targets[s:s + chunk_size]
        temp = temperature[s:s + chunk_size] if isinstance(temperature, torch.Tensor) else temperature
        if grad:
            lp, ent = checkpoint(_chunk_logp_entropy, h, weight, bias, t, temp, need_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logp_entropy(h, weight, bias, t, temp, need_entropy)
        outs_lp.append(lp)
        outs_ent.append(ent)
    if not outs_lp:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(outs_lp), torch.cat(outs_ent)


def _decoder_and_head(lm: nn.Module):
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft
    return base.get_decoder(), base.get_output_embeddings()


class PolicyModule(nn.Module):
    """Wraps a HF causal LM (optionally peft-wrapped).  ``forward`` returns per-token
    log-probs [S,T] and entropy [S,T] of the given responses (0 on padding)."""

    def __init__(self, lm: nn.Module, pad_id: int, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.pad_id = pad_id
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, idx_rows, idx_pred, idx_resp, shape: Tuple[int, int],
                temperature: float | torch.Tensor = 1.0, need_entropy: bool = False, return_hidden: bool = False):
        """``temperature``: a float, or a [N] tensor with one temperature per real response position
        (ordered like ``idx_rows``) for batches whose rows were sampled at different temperatures."""
        decoder, head = _decoder_and_head(self.lm)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        h = hs[idx_rows, idx_pred]                       # [N, H] real response positions only
        targets = input_ids[idx_rows, idx_pred + 1]
        lp, ent = chunked_logprobs(h, head, targets, temperature, need_entropy, self.chunk_size)
        S, T = shape
        logp = lp.new_zeros(S, T).index_put((idx_rows, idx_resp), lp)
        entropy = ent.new_zeros(S, T).index_put((idx_rows, idx_resp), ent)
        hidden = None
        if return_hidden:
            hidden = h.new_zeros(S, T, h.shape[-1]).index_put((idx_rows, idx_resp), h)
        return logp, entropy, hidden


class ValueModule(nn.Module):
    """PPO critic: a decoder backbone plus a scalar head; the value at response
    token t is read at the position that predicts t (the state before t)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.v_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, idx_rows, idx_pred, idx_resp, shape):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hs = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        v = self.v_head(hs[idx_rows, idx_pred]).squeeze(-1).float()
        S, T = shape
        return v.new_zeros(S, T).index_put((idx_rows, idx_resp), v)


def disable_dropout(model: nn.Module) -> None:
    """RL ratios assume the same function at rollout, scoring and update time."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for k in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, k, None), float):
            setattr(cfg, k, 0.0)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from .toy import resolve

    tok = AutoTokenizer.from_pretrained(resolve(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    from .toy import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve(path), **kw)
    disable_dropout(model)
    return model


def load_backbone(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModel

    from .toy import resolve

    model = AutoModel.from_pretrained(resolve(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model
