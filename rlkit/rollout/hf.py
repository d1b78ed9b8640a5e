"""Hugging Face rollout engine (the embedded default; runs anywhere).

It samples from the trainer's own model object, so weight sync is a no-op.
Generation runs under ``torch.no_grad`` with the KV cache, left-padded batches,
and ``n`` samples per prompt.  Two decode paths (``rollout.engine_args: {decode: ...}``):
``lean`` (default), rlkit's own loop over the model's forward (:mod:`rlkit.rollout.hf_lean`:
less per-token overhead, finished rows leave the batch), and ``generate``, HF
``generate`` with the logits processors below; both record the same log-probs.
On the ``generate`` path, temperature, top-p and top-k are applied by
our own logits processors so that the recorded log-prob is exactly the
engine-wide convention (see :mod:`rlkit.rollout.base`).  Only one ``[B, V]``
log-prob tensor is alive at a time: each step's processor gathers the previous
step's sampled-token log-prob from the ids HF appends.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..registry import register_rollout_engine
from .base import Completion, RolloutEngine, SamplingParams


class _RecordLogprobs:
    """Logits processor: temperature-scales the scores and records, one step late,
    the log-prob of the token that was sampled from the previous step's scores."""

    def __init__(self, temperature: float, prompt_len: int):
        self.t = temperature
        self.prompt_len = prompt_len
        self.prev: torch.Tensor | None = None
        self.out: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids)
        scores = scores.float() / self.t
        self.prev = torch.log_softmax(scores, dim=-1)
        return scores

    def collect(self, input_ids: torch.LongTensor) -> None:
        if self.prev is not None and input_ids.shape[1] > self.prompt_len + len(self.out):
            tok = input_ids[:, -1:]
            self.out.append(self.prev.gather(-1, tok.to(self.prev.device)).squeeze(-1))  # stays on device: no per-token sync
            self.prev = None


class _TopKTopP:
    def __init__(self, top_k: int, top_p: float):
        self.top_k, self.top_p = top_k, top_p

    def __call__(self, input_ids, scores):
        if self.top_k and self.top_k > 0 and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, idx = torch.sort(scores, descending=True, dim=-1)
            probs = torch.softmax(sorted_scores, dim=-1)
            cum = probs.cumsum(-1)
            remove = cum - probs > self.top_p          # keep the smallest set whose mass reaches top_p
            remove_orig = torch.zeros_like(remove).scatter(-1, idx, remove)
            scores = scores.masked_fill(remove_orig, float("-inf"))
        return scores


@register_rollout_engine("hf")
class HFEngine(RolloutEngine):
    name = "hf"

    DECODE_MODES = ("lean", "generate")
    DEFAULTS = {"decode": "lean"}

    @classmethod
    def check_engine_args(cls, engine_args) -> None:
        """``rollout.engine_args`` for ``engine: hf``: ``decode: lean | generate`` (run by config validation)."""
        from ..registry import PluginError, suggest

        unknown = sorted(set(engine_args) - set(cls.DEFAULTS))
        if unknown:
            raise PluginError(f"rollout.engine_args: unknown hf engine option(s) {unknown}; known: {sorted(cls.DEFAULTS)}."
                              + suggest(unknown[0], cls.DEFAULTS))
        decode = engine_args.get("decode", cls.DEFAULTS["decode"])
        if decode not in cls.DECODE_MODES:
            raise PluginError(f"rollout.engine_args.decode={decode!r}: use one of {list(cls.DECODE_MODES)}")

    def __init__(self, model, tokenizer, samples_per_generate_call: int = 256, decode: str = "lean", **_):
        self.check_engine_args({"decode": decode})
        self.decode = decode
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max(1, int(samples_per_generate_call))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> List[int]:
        ids = set()
        cfg = getattr(self.model, "generation_config", None)
        for src in (getattr(cfg, "eos_token_id", None), self.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        return sorted(ids)

    @staticmethod
    def _zero3_sharded(model) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        p = next(model.parameters(), None)
        return p is not None and hasattr(p, "ds_id")

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> List[List[Completion]]:
        if sampling.greedy and n > 1:  # every greedy sample is the same: decode once, copy (HF rejects greedy n > 1)
            return [[row[0]] * n for row in self.generate(prompt_ids, 1, sampling)]
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompts_per_call = max(1, self.max_batch // max(1, n))
        results: List[List[Completion]] = []
        try:
            for start in range(0, len(prompt_ids), prompts_per_call):
                chunk = [list(p) for p in prompt_ids[start:start + prompts_per_call]]
                P = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), P), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(chunk), P), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
                    att[i, P - len(p):] = 1
                if not sampling.greedy and sampling.seed is not None:
                    torch.manual_seed(sampling.seed + start)
                if self._use_lean(model):
                    gen, lps = self._lean(model, ids.to(device), att.to(device), n, sampling)
                    gen, lps = gen.cpu(), lps.cpu()
                else:
                    gen, lps = self._generate(model, ids.to(device), att.to(device), n, sampling, P)
                for i in range(len(chunk)):
                    row: List[Completion] = []
                    for j in range(n):
                        r = i * n + j
                        row.append(self._completion(gen[r], lps[r], sampling))
                    results.append(row)
        finally:
            if was_training:
                model.train()
        return results

    def _use_lean(self, model) -> bool:
        from .hf_lean import unsupported_generation_setting

        return self.decode == "lean" and not self._zero3_sharded(model) and unsupported_generation_setting(model) is None

    def _lean(self, model, ids, att, n, sampling):
        from transformers import StopStringCriteria

        from .hf_lean import lean_decode

        trunc = _TopKTopP(sampling.top_k, sampling.top_p)
        stop = StopStringCriteria(self.tokenizer, list(sampling.stop)) if sampling.stop else None
        gc = getattr(model, "generation_config", None)
        return lean_decode(model, ids, att, n, max_new_tokens=sampling.max_new_tokens,
                           temperature=sampling.logprob_temperature, greedy=sampling.greedy,
                           truncate=lambda s: trunc(None, s), eos_ids=self.eos_ids, pad_id=self.pad_id,
                           stop_criteria=stop, min_new_tokens=int(getattr(gc, "min_new_tokens", None) or 0))

    def _generate(self, model, ids, att, n, sampling, P):
        """HF ``generate`` with rlkit's logits processors (``decode: generate``)."""
        from transformers import LogitsProcessorList

        rec = _RecordLogprobs(sampling.logprob_temperature, P)
        procs = LogitsProcessorList([rec])
        if not sampling.greedy:
            procs.append(_TopKTopP(sampling.top_k, sampling.top_p))
        gen_kwargs = dict(
            input_ids=ids, attention_mask=att,
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
            do_sample=not sampling.greedy, temperature=None, top_p=None, top_k=None,
            logits_processor=procs, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
            use_cache=True, return_dict_in_generate=True,
        )
        if sampling.stop:
            gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if self._zero3_sharded(model):  # every rank keeps stepping until all are done (parameter gathers)
            gen_kwargs["synced_gpus"] = True
        out = model.generate(**gen_kwargs)
        seqs = out.sequences
        rec.collect(seqs)
        gen = seqs[:, P:].cpu()
        lps = torch.stack(rec.out, dim=1).cpu() if rec.out else torch.zeros(gen.shape[0], 0)
        return gen, lps

    def _completion(self, toks: torch.Tensor, lps: torch.Tensor, sampling: SamplingParams) -> Completion:
        toks_l = toks.tolist()
        L = len(toks_l)
        finish = "length"
        for t, tok in enumerate(toks_l):
            if tok in self.eos_ids:
                L, finish = t + 1, "stop"
                break
        if finish == "length" and sampling.stop and any(
                s in self.tokenizer.decode(toks_l, skip_special_tokens=True) for s in sampling.stop):
            # a stop string ended generation early and HF padded the rest of the row:
            # find the first token at which a stop string is complete
            for t in range(len(toks_l)):
                text_so_far = self.tokenizer.decode(toks_l[: t + 1], skip_special_tokens=True)
                if any(s in text_so_far for s in sampling.stop):
                    L, finish = t + 1, "stop"
                    break
        ids = toks_l[:L]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(token_ids=ids, logprobs=lps[:L].tolist(), finish_reason=finish, text=text)
