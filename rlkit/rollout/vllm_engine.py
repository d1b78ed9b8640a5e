"""vLLM rollout engine, colocated: one vLLM engine inside every training process.

``rollout.engine=vllm`` is the only recipe change; backend options go in
``rollout.engine_args`` (see :class:`VLLMEngine` and ``docs/vllm.md``).  vLLM is
imported only when the engine is constructed, so rlkit imports (and
``python -m rlkit plugins`` lists ``vllm``) without it; construction without it
fails with an install hint.

* **Generation**: token-id prompts (prompt + response prefix for SPO), ``n`` samples per
  prompt, stop strings, max tokens, EOS ids from the model's generation config and the
  tokenizer, as in the HF engine.
* **Log-probs** follow :mod:`rlkit.rollout.base`: ``log_softmax(logits / T)`` of each sampled
  token before top-p / top-k (greedy: ``T = 1``).  vLLM's ``logprobs_mode`` decides what it
  returns: ``raw_logprobs`` (its default) is ``log_softmax(logits)`` before temperature, and
  ``processed_logprobs`` is after temperature *and* after top-k / top-p.  ``processed`` is
  therefore exact for every temperature when top-p = 1 and top-k is off (the usual RL setting),
  ``raw`` is exact at T = 1 with any top-p / top-k, and greedy is exact in both.
  ``logprobs_mode: auto`` (default) picks ``raw`` for a recipe that samples at T = 1 with
  top-p / top-k, else ``processed``; a request no mode serves exactly logs one warning (the
  trainer's ``logprob_gap`` then also contains the truncated mass).
* **Weight sync** (:meth:`VLLMEngine.sync_weights`, after every optimizer step): the trainer's
  parameters are streamed, under their HF checkpoint names, into one in-place
  ``reload_weights`` call; peft LoRA is merged per layer on the fly (``W + ΔW``, the trainer's
  weights are never modified), ZeRO-3 parameters are gathered one bucket
  (``sync_bucket_mb``) at a time; the prefix cache is reset afterwards.
* **Memory**: on CUDA the engine takes ``gpu_memory_utilization`` (default 0.3) of the GPU,
  checked against free memory before vLLM starts, and sleeps (``sleep_level``) while the
  trainer runs.  On CPU: ``kv_cache_memory_bytes`` (64 MiB default), eager mode, in-process
  ``uni`` executor; sleep is a no-op.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..registry import PluginError, register_rollout_engine
from .base import Completion, RolloutEngine, SamplingParams
from .vllm_adapter import VLLMAdapter, platform_device

log = logging.getLogger("rlkit")

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
LOGPROBS_MODES = ("auto", "processed_logprobs", "raw_logprobs")


def logprobs_exact(mode: str, sampling: SamplingParams) -> bool:
    """Whether vLLM's ``mode`` returns rlkit's log-prob convention for these sampling settings."""
    if sampling.greedy:
        return True
    truncates = sampling.top_p < 1.0 or (sampling.top_k or 0) > 0
    if mode == "processed_logprobs":
        return not truncates
    return sampling.temperature == 1.0


def choose_logprobs_mode(temperature: float, top_p: float, top_k: int) -> str:
    truncates = top_p < 1.0 or (top_k or 0) > 0
    return "raw_logprobs" if truncates and temperature == 1.0 else "processed_logprobs"


def check_gpu_memory(utilization: float, device: Optional[int] = None) -> None:
    """vLLM reserves ``utilization`` x total GPU memory and needs it free at start-up: fail clearly first."""
    if not torch.cuda.is_available():
        return
    dev = torch.cuda.current_device() if device is None else device
    free, total = torch.cuda.mem_get_info(dev)
    need = utilization * total
    if free < need:
        gib = 1024 ** 3
        raise RuntimeError(
            f"vLLM engine: rollout.engine_args.gpu_memory_utilization={utilization} asks for {need / gib:.1f} GiB of "
            f"cuda:{dev} ({total / gib:.1f} GiB), but only {free / gib:.1f} GiB is free after the trainer's models and "
            f"optimizer were placed. Lower gpu_memory_utilization (at most {free / total:.2f} here), shorten max_model_len, "
            f"or free trainer memory (LoRA, ZeRO-3, gradient checkpointing, a smaller micro-batch).")


# ----------------------------------------------------------------- weights
def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model") and hasattr(model, "merge_adapter")


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


def _gathered(params: List[torch.nn.Parameter]):
    if not params or not any(_is_zero3(p) for p in params):
        return nullcontext()
    import deepspeed  # guarded: only reached when parameters are ZeRO-3 partitioned

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def _hf_name(name: str, peft: bool) -> Optional[str]:
    """Trainer parameter name -> HF checkpoint name (None = not a checkpoint tensor: LoRA factors, peft copies)."""
    if not peft:
        return name
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    out = []
    i = 0
    while i < len(parts):
        if parts[i] == "base_layer":
            i += 1
            continue
        if parts[i] == "modules_to_save":  # X.modules_to_save.<adapter>.weight -> X.weight
            i += 2
            continue
        out.append(parts[i])
        i += 1
    return ".".join(out)


def _lora_layers(model) -> Dict[str, Any]:
    """Module name -> peft LoRA layer, for layers whose base weight must be merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _merged(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the layer's active adapters added; a new tensor, the layer is left untouched."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return weight
    out = weight
    for name in layer.active_adapters:
        if name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {}):
            out = out + layer.get_delta_weight(name).to(out.dtype)
    return out


def iter_hf_weights(model, bucket_bytes: int = 256 << 20, dtype: Optional[torch.dtype] = None,
                    clone: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(HF checkpoint name, tensor)`` for every weight of ``model``, in module order, lazily.

    * plain model: the parameters themselves (detached, no copy unless ``dtype`` or ``clone`` asks);
    * peft LoRA: base weights under their original names with ``ΔW`` of the active adapters added,
      one layer at a time (the trainer's weights are not modified, so no merge/unmerge rounding drift;
      DoRA layers fall back to peft's ``merge_adapter``/``unmerge_adapter``);
    * DeepSpeed ZeRO-3: parameters are gathered ``bucket_bytes`` at a time with
      ``deepspeed.zero.GatheredParameters`` and the yielded tensors are copies (the gathered storage
      is released when the bucket ends).  Every rank must iterate (the gather is a collective).
    """
    peft = _is_peft(model)
    layers = _lora_layers(model) if peft else {}
    dora = any(any(getattr(m, "use_dora", {}).get(a, False) for a in m.active_adapters) for m in layers.values())
    if dora:
        model.merge_adapter()
        layers = {}
    try:
        params = dict(model.named_parameters())
        entries: List[Tuple[str, torch.nn.Parameter, Optional[Any], List[torch.nn.Parameter]]] = []
        for name, p in params.items():
            hf = _hf_name(name, peft)
            if hf is None:
                continue
            mod_name = name.rsplit(".", 1)[0]
            layer = layers.get(mod_name[: -len(".base_layer")]) if mod_name.endswith(".base_layer") else None
            extra = [q for n, q in layer.named_parameters() if "lora_" in n] if layer is not None and name.endswith(".weight") else []
            entries.append((hf, p, layer if extra else None, extra))
        zero3 = any(_is_zero3(p) for p in params.values())
        bucket: List[Any] = []
        size = 0
        for e in entries + [None]:
            if e is not None:
                bucket.append(e)
                size += sum(_numel(q) * q.element_size() for q in [e[1], *e[3]])
                if size < bucket_bytes:
                    continue
            if not bucket:
                break
            with _gathered([q for b in bucket for q in [b[1], *b[3]]] if zero3 else []):
                for hf, p, layer, _ in bucket:
                    t = p.detach()
                    if layer is not None:
                        t = _merged(layer, t)
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)
                    elif clone or zero3:
                        t = t.clone()
                    yield hf, t
            bucket, size = [], 0
    finally:
        if dora:
            model.unmerge_adapter()


# ------------------------------------------------------------------ engine
@register_rollout_engine("vllm")
class VLLMEngine(RolloutEngine):
    """vLLM, colocated with the trainer (one engine per rank); weights streamed in after every step."""

    name = "vllm"
    #: engine_args and their defaults (None = decided from the platform / recipe at start-up)
    DEFAULTS: Dict[str, Any] = dict(
        model_path=None,               # weights/config vLLM starts from (default: model.name_or_path)
        tokenizer_path=None,           # default: model.tokenizer or model_path
        dtype=None,                    # default: the trainer model's dtype
        tensor_parallel_size=1,        # >1: one engine sharded over that many ranks (external launcher) or workers
        executor=None,                 # vLLM distributed_executor_backend; default uni / external_launcher / mp
        gpu_memory_utilization=0.3,    # CUDA: share of the GPU vLLM reserves (weights + KV cache)
        kv_cache_memory_bytes=None,    # CPU default 64 MiB; CUDA default None (= use gpu_memory_utilization)
        max_model_len=None,            # default: data.max_prompt_tokens + max new tokens, capped by the model
        enforce_eager=None,            # default: True on CPU (compiling is slower there), False on CUDA
        enable_sleep_mode=None,        # default: True on CUDA, False elsewhere (unsupported)
        sleep_level=1,                 # 1 = offload weights to CPU and drop the KV cache while training
        sync_bucket_mb=256,            # weight-sync bucket: ZeRO-3 gather unit / safetensors shard size
        logprobs_mode="auto",          # auto | processed_logprobs | raw_logprobs (see module doc)
        seed=None,                     # default: trainer.seed (+ rank // tensor_parallel_size)
        staging_dir=None,              # multi-process executors: where synced shards are written (default /dev/shm)
        debug_skip_sync_steps=(),      # 1-based sync_weights calls to skip (tests the log-prob gap check)
        llm_kwargs=None,               # anything else, passed to vllm.LLM as is
    )

    @classmethod
    def check_engine_args(cls, engine_args: Dict[str, Any]) -> None:
        """Cheap checks of ``rollout.engine_args`` (run by config validation, before any model loads)."""
        unknown = sorted(set(engine_args) - set(cls.DEFAULTS))
        if unknown:
            from ..registry import suggest

            raise PluginError(f"rollout.engine_args: unknown vllm engine option(s) {unknown}; known: {sorted(cls.DEFAULTS)}."
                              + suggest(unknown[0], cls.DEFAULTS))
        a = {**cls.DEFAULTS, **engine_args}
        if a["logprobs_mode"] not in LOGPROBS_MODES:
            raise PluginError(f"rollout.engine_args.logprobs_mode={a['logprobs_mode']!r}: use one of {LOGPROBS_MODES}")

    @classmethod
    def preflight(cls, config, model_config) -> None:
        """Checks that need vLLM or the model's config but no weights (the trainer runs them before loading the model):
        vLLM importable and of a supported version; on CPU, an attention head size vLLM's CPU backend supports."""
        from .vllm_adapter import import_vllm

        import_vllm()
        if platform_device() == "cpu":
            cls._check_cpu_head_size(model_config)

    def __init__(self, model, tokenizer, config=None, samples_per_generate_call: int = 256, **engine_args):
        self.check_engine_args(engine_args)
        a = {**self.DEFAULTS, **engine_args}
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = config
        self.args = a
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.bucket_bytes = max(1, int(float(a["sync_bucket_mb"]) * (1 << 20)))
        self.skip_syncs = {int(s) for s in (a["debug_skip_sync_steps"] or ())}
        self.sync_calls = 0
        self.last_sync_s = 0.0
        self.last_sync_tensors = 0
        self._warned: set = set()

        rank, world = self._dist()
        tp = int(a["tensor_parallel_size"])
        executor = a["executor"] or ("external_launcher" if world > 1 else "mp" if tp > 1 else "uni")
        if world > 1 and world % tp:
            raise PluginError(f"rollout.engine_args.tensor_parallel_size={tp} must divide the number of processes ({world})")
        self.tp, self.executor, self.rank = tp, executor, rank
        self.tp_group = self._tp_group(world, tp) if executor == "external_launcher" and tp > 1 else None

        model_path = a["model_path"] or self._model_path(model, config)
        dtype = a["dtype"] or _DTYPES.get(next(model.parameters()).dtype, "auto")
        seed = a["seed"] if a["seed"] is not None else (getattr(getattr(config, "trainer", None), "seed", 0) or 0)
        seed = int(seed) + (rank // tp if executor == "external_launcher" else 0)
        mode = a["logprobs_mode"]
        if mode == "auto":
            r = getattr(config, "rollout", None)
            mode = choose_logprobs_mode(r.temperature, r.top_p, r.top_k) if r is not None else "processed_logprobs"
        self.logprobs_mode = mode

        # the device decides the defaults; import_vllm inside the adapter gives the install hint
        from .vllm_adapter import import_vllm

        import_vllm()
        self.device = platform_device()
        cuda = self.device == "cuda"
        if self.device == "cpu":
            self._check_cpu_head_size(model)
        util = float(a["gpu_memory_utilization"]) if cuda else None
        if cuda:
            check_gpu_memory(util)
        kv = a["kv_cache_memory_bytes"] if a["kv_cache_memory_bytes"] is not None else (None if cuda else 64 << 20)
        self.sleep_enabled = bool(cuda if a["enable_sleep_mode"] is None else a["enable_sleep_mode"])
        t0 = time.perf_counter()
        try:
            self.adapter = VLLMAdapter(
                model_path, dtype=dtype, seed=seed, tensor_parallel_size=tp, executor=executor, gpu_memory_utilization=util,
                kv_cache_memory_bytes=kv, max_model_len=a["max_model_len"] or self._max_model_len(model, config),
                enforce_eager=(not cuda) if a["enforce_eager"] is None else bool(a["enforce_eager"]),
                enable_sleep_mode=self.sleep_enabled, logprobs_mode=mode,
                trust_remote_code=bool(getattr(getattr(config, "model", None), "trust_remote_code", False)),
                tokenizer=a["tokenizer_path"] or self._tokenizer_path(config, model_path), llm_kwargs=a["llm_kwargs"])
        except (ValueError, TypeError, RuntimeError) as e:  # vLLM's own checks (llm_kwargs, max_model_len, memory,
            # a KV cache too small for max_model_len: its engine-core process fails with RuntimeError): one line
            from ..errors import VLLMSetupError

            raise VLLMSetupError(f"vLLM did not start ({type(e).__name__}: {' '.join(str(e).split())[:500]}); "
                                 f"check rollout.engine_args (docs/vllm.md)") from e
        self.startup_s = time.perf_counter() - t0
        self.engine_dtype = getattr(torch, dtype, None) if dtype != "auto" else None
        self._weights_asleep = self._kv_asleep = False
        log.info("vLLM %s engine on %s (%s executor, tp=%d, dtype=%s, logprobs_mode=%s) started in %.1fs",
                 self.adapter.version, self.device, executor, tp, dtype, mode, self.startup_s)

    # --------------------------------------------------------------- set-up
    @staticmethod
    def _dist() -> Tuple[int, int]:
        d = torch.distributed
        if d.is_available() and d.is_initialized():
            return d.get_rank(), d.get_world_size()
        return 0, 1

    @staticmethod
    def _tp_group(world: int, tp: int):
        group, _ = torch.distributed.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])
        return group

    @staticmethod
    def _model_path(model, config) -> str:
        from ..toy import resolve

        name = getattr(getattr(config, "model", None), "name_or_path", None)
        if name is None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            name = getattr(getattr(base, "config", None), "_name_or_path", None)
        if not name:
            raise PluginError("vllm engine: no model path; set model.name_or_path or rollout.engine_args.model_path")
        return resolve(name)

    @staticmethod
    def _check_cpu_head_size(model) -> None:
        """``model``: a model, or its config (``PretrainedConfig``)."""
        from .vllm_adapter import cpu_attention_head_sizes

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        c = getattr(base, "config", None) if not hasattr(base, "num_attention_heads") else base
        if c is None or not getattr(c, "num_attention_heads", None):
            return
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        sizes = cpu_attention_head_sizes()
        if head not in sizes:
            raise PluginError(f"vllm engine on CPU: the model's attention head size is {head}, but vLLM's CPU attention supports "
                              f"only {sizes} (toy:tiny has 16: see docs/vllm.md for a CPU-sized test model)")

    @staticmethod
    def _tokenizer_path(config, model_path: str) -> str:
        from ..toy import resolve

        tok = getattr(getattr(config, "model", None), "tokenizer", None)
        return resolve(tok) if tok else model_path

    @staticmethod
    def _max_model_len(model, config) -> Optional[int]:
        if config is None:
            return None
        new = max(int(config.rollout.max_new_tokens), int(getattr(config.eval, "max_new_tokens", None) or 0))
        n = int(config.data.max_prompt_tokens) + new
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cap = getattr(getattr(base, "config", None), "max_position_embeddings", None)
        return min(n, int(cap)) if cap else n

    @staticmethod
    def _eos_ids(model, tokenizer) -> List[int]:
        ids = set()
        cfg = getattr(model, "generation_config", None)
        for src in (getattr(cfg, "eos_token_id", None), tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        return sorted(ids)

    # ----------------------------------------------------------- generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> List[List[Completion]]:
        if self._weights_asleep or self._kv_asleep:
            self.wake_up()
        if not logprobs_exact(self.logprobs_mode, sampling):
            key = (sampling.temperature, sampling.top_p, sampling.top_k)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("vllm engine: temperature=%s with top_p=%s/top_k=%s is not served exactly by logprobs_mode=%s: "
                            "rollout log-probs include the top-p/top-k renormalisation (or miss the temperature); "
                            "logprob_gap measures that too (docs/vllm.md)", *key, self.logprobs_mode)
        prompts = [list(p) for p in prompt_ids]
        offset, sizes = 0, None
        if self.tp_group is not None:  # every rank of a tensor-parallel group must submit the same requests
            sizes = [None] * self.tp
            torch.distributed.all_gather_object(sizes, (len(prompts), prompts), group=self.tp_group)
            offset = sum(s[0] for s in sizes[: self.rank % self.tp])
            prompts = [p for s in sizes for p in s[1]]
        seeds = self._seeds(len(prompts), n, sampling)
        outs = self.adapter.generate(prompts, n=n, temperature=0.0 if sampling.greedy else sampling.temperature,
                                     top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0 if sampling.greedy else sampling.top_k,
                                     max_tokens=sampling.max_new_tokens, stop=list(sampling.stop), stop_token_ids=self.eos_ids,
                                     seeds=seeds)
        if sizes is not None:
            outs = outs[offset: offset + len(prompt_ids)]
        return [[self._completion(ids, lps, fin) for ids, lps, fin in row] for row in outs]

    def _seeds(self, num_prompts: int, n: int, sampling: SamplingParams) -> Optional[List[int]]:
        """Per-request seeds (vLLM gives child k of a request seed + k).  From ``sampling.seed`` when set, else drawn
        from torch's RNG, which the trainer checkpoints: a resumed run samples what the uninterrupted one did."""
        if sampling.greedy:
            return None
        if sampling.seed is not None:
            base = int(sampling.seed)
        elif self.tp_group is not None:  # the group must agree: take rank-0-of-group's draw
            box = [int(torch.randint(0, 2 ** 30, (1,)).item())]
            torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self.tp_group, 0),
                                                    group=self.tp_group)
            base = box[0]
        else:
            base = int(torch.randint(0, 2 ** 30, (1,)).item())
        return [(base + i * n) % (2 ** 31 - 1) for i in range(num_prompts)]

    def _completion(self, ids: List[int], lps: List[float], finish: str) -> Completion:
        finish = "stop" if finish == "stop" else "length"
        return Completion(token_ids=ids, logprobs=lps, finish_reason=finish,
                          text=self.tokenizer.decode(ids, skip_special_tokens=True))

    # ---------------------------------------------------------- weight sync
    def sync_weights(self, model) -> None:
        """Stream ``model``'s weights into vLLM (every rank calls this after each optimizer step)."""
        self.sync_calls += 1
        self.model = model
        if self.sync_calls in self.skip_syncs:
            log.warning("vllm engine: debug_skip_sync_steps skips weight sync #%d (the engine keeps stale weights)", self.sync_calls)
            return
        t0 = time.perf_counter()
        if self._weights_asleep:  # weights must be resident to be overwritten; the KV cache stays asleep
            self.adapter.wake_up(tags=["weights"])
            self._weights_asleep = False
        dtype = None if self.adapter.in_process else self.engine_dtype  # shards on disk: write in the engine's dtype
        self.last_sync_tensors = self.adapter.load_weights(iter_hf_weights(model, self.bucket_bytes, dtype=dtype),
                                                           self.bucket_bytes, staging_dir=self.args["staging_dir"])
        self.last_sync_s = time.perf_counter() - t0

    # ---------------------------------------------------------------- memory
    def sleep(self) -> None:
        if self.sleep_enabled and not (self._weights_asleep or self._kv_asleep):
            self.adapter.sleep(level=int(self.args["sleep_level"]))
            self._weights_asleep = self._kv_asleep = True

    def wake_up(self) -> None:
        if not self.sleep_enabled:
            return
        if self._weights_asleep:
            self.adapter.wake_up()
        elif self._kv_asleep:
            self.adapter.wake_up(tags=["kv_cache"])
        self._weights_asleep = self._kv_asleep = False

    def close(self) -> None:
        adapter = getattr(self, "adapter", None)
        if adapter is not None:
            adapter.shutdown()
