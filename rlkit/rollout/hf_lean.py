"""The HF engine's lean decode loop (``rollout.engine_args: {decode: lean}``, the default).

A profile of ``HFEngine`` on CPU (docs/benchmarks.md, "HF engine: lean decode loop vs `generate`") showed HF ``generate``
spending about a fifth of its time outside the model's forward: per-step ``prepare_inputs_for_generation``,
kwargs updates, stopping-criteria and logits-processor dispatch, output bookkeeping.  This loop calls the
model's forward with a :class:`~transformers.DynamicCache` itself and does exactly what ``generate``'s
``_sample`` does with rlkit's processors, in the same order, with the same random draws:

* position ids ``cumsum(attention_mask) - 1`` (0 on left padding), the mask dropped when there is no padding,
  ``logits_to_keep=1``, fp32 copies of the last logits;
* the model's ``generation_config.min_new_tokens`` masks EOS (HF's ``MinNewTokensLengthLogitsProcessor``);
* the recorded log-prob is ``log_softmax(logits / T)`` before top-k/top-p (greedy: ``T = 1``), the engine-wide
  convention of :mod:`rlkit.rollout.base`;
* sampling is one ``torch.multinomial(softmax(truncated scores), 1)`` per step over the batch, as ``generate``
  does; greedy is the argmax;
* EOS and HF's own :class:`~transformers.StopStringCriteria` finish rows; unlike ``generate``, which keeps
  running finished rows (on pad tokens) until the longest row ends, a finished row leaves the forward batch (its
  KV-cache rows are dropped), so a call with a long tail of lengths costs only the tokens it generates.  The
  loop ends when every row has finished or ``max_new_tokens`` is reached; finished rows are padded.

Determinism: given the seed, a call is reproducible.  While no row has finished, the draws are the very ones
``generate`` makes (same batch, same ``multinomial`` call); after a row finishes, the batch differs, so the later
samples of the other rows differ from ``generate``'s (same distribution, other draws).  Greedy decoding is the
argmax either way.

Generation-config settings the loop does not implement (repetition penalty, bad words, ...) make the engine fall
back to ``generate`` (:func:`unsupported_generation_setting`).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Tuple

import torch

# generation_config fields that add logits processors / stopping criteria to HF generate: the lean loop only
# implements min_new_tokens, so any other non-default value falls back to generate
_PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                     "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "forced_bos_token_id",
                     "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                     "exponential_decay_length_penalty", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                     "renormalize_logits", "guidance_scale", "watermarking_config", "max_time", "stop_strings",
                     "cache_implementation", "prompt_lookup_num_tokens", "assistant_model")


def unsupported_generation_setting(model) -> Optional[str]:
    """The first ``generation_config`` field with a non-default value the lean loop does not implement, or None."""
    from transformers import GenerationConfig

    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return None
    default = GenerationConfig()
    for f in _PROCESSOR_FIELDS:
        v = getattr(cfg, f, None)
        if v is not None and v != getattr(default, f, None):
            return f
    if getattr(model.config, "is_encoder_decoder", False):
        return "is_encoder_decoder"
    params = inspect.signature(model.forward).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name in ("position_ids", "past_key_values"):
            if name not in params:
                return f"forward() without {name}"
    return None


def _accepts_logits_to_keep(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params


@torch.no_grad()
def lean_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, *, max_new_tokens: int,
                temperature: float, greedy: bool, truncate, eos_ids: Sequence[int], pad_id: int,
                stop_criteria=None, min_new_tokens: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` continuations of each left-padded row.  Returns ``(generated ids [B*n, T], log-probs [B*n, T])``
    with rows ordered prompt-major (row ``i * n + j``), ``T <= max_new_tokens``; after its last token a row holds
    ``pad_id`` (log-prob 0).
    ``truncate(scores) -> scores`` applies top-k/top-p to temperature-scaled scores (sampling only)."""
    from transformers import DynamicCache

    device = input_ids.device
    ids = input_ids.repeat_interleave(n, dim=0) if n > 1 else input_ids
    att = attention_mask.repeat_interleave(n, dim=0) if n > 1 else attention_mask
    B = ids.shape[0]
    pos = (att.long().cumsum(-1) - 1).masked_fill(att == 0, 0)
    mask = None if bool((att == 1).all()) else att  # HF generate drops an all-ones mask too
    cache = DynamicCache(config=model.config)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device) if eos_ids else None
    toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)  # the rows still in the forward batch (finished rows are dropped)
    seq = ids                              # their full sequences, only needed by stop strings
    T = 0
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                return_dict=True, **keep)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        if eos is not None and t < min_new_tokens:
            logits[:, eos] = float("-inf")
        scores = logits / temperature
        logp = torch.log_softmax(scores, dim=-1)
        if greedy:
            nxt = torch.argmax(scores, dim=-1)
        else:
            probs = torch.softmax(truncate(scores), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
        toks[rows, t] = nxt
        lps[rows, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)
        T = t + 1
        done = torch.isin(nxt, eos) if eos is not None else torch.zeros_like(nxt, dtype=torch.bool)
        if stop_criteria is not None:
            seq = torch.cat([seq, nxt[:, None]], dim=-1)
            done |= stop_criteria(seq, scores)
        if T == max_new_tokens or bool(done.all()):
            break
        pos = pos[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if bool(done.any()):  # drop finished rows from the batch: the cache, positions, mask and inputs
            live = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(live)
            rows, nxt, pos, seq = rows[live], nxt[live], pos[live], seq[live]
            if mask is not None:
                mask = mask[live]
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, return_dict=True)
    return toks[:, :T], lps[:, :T]
