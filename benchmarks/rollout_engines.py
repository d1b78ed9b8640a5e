#!/usr/bin/env python
"""HF ``generate`` vs vLLM rollout engines on the same prompts: tokens/s, time to first batch, peak memory.

    python benchmarks/rollout_engines.py                                   # CPU: tiny Llama (head size 32), both engines
    python benchmarks/rollout_engines.py --model-config qwen2.5-0.5b       # GPU run: random-weight Qwen2.5-0.5B-sized model
    python benchmarks/rollout_engines.py --model DIR --prompts 64 --samples 8 --new-tokens 256

Each engine runs in its own subprocess (so peak memory is its own): it loads the model, builds the
engine, then makes ``--rounds`` generate calls of ``--prompts`` prompts x ``--samples`` samples with at
most ``--new-tokens`` new tokens each (temperature 1, the same seeds; a random model samples EOS about once
per vocabulary size, so lengths are nearly the maximum; tokens/s counts the tokens actually generated).
For vLLM one weight sync of the full model is timed too.  Reported:

* **first batch s**: engine construction + the first generate call (what a first RL step waits for);
* **tokens/s**: generated tokens / seconds over the remaining calls (median call);
* **peak memory**: CPU: the process's peak RSS (``resource.getrusage``), which includes the HF model the
  trainer holds anyway and, for vLLM, the vLLM import and its KV cache (``kv_cache_memory_bytes``);
  CUDA: the larger of ``torch.cuda.max_memory_allocated`` and the device memory in use at the end
  (vLLM reserves ``gpu_memory_utilization`` of the GPU up front, partly outside torch's statistics).

The model is random-weight: only shapes matter for speed.  ``--model-config qwen2.5-0.5b`` writes a
Qwen2ForCausalLM with Qwen2.5-0.5B's shapes (24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151936,
tied embeddings) in bf16 and a character tokenizer covering the prompts; it is meant for a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = {
    # vLLM's CPU attention needs head sizes in {32, 64, 80, ...}; rlkit's toy:tiny has 16, so this is toy:tiny with 2 heads
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=1024, dtype="float32"),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, dtype="bfloat16"),
}


def build_model(name: str, path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlkit.toy import make_tokenizer

    spec = dict(CONFIGS[name])
    arch, dtype = spec.pop("arch"), spec.pop("dtype")
    tok = make_tokenizer()
    spec.setdefault("vocab_size", len(tok))
    cls_cfg, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cls_cfg(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **spec)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = cls(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def prompts(tok, n: int, seed: int = 0):
    from rlkit.toy import echo_rows

    return [tok(r["question"])["input_ids"] for r in echo_rows(n, seed=seed)]


def peak_memory_mb(device: str) -> float:
    if device == "cuda":  # the larger of torch's own peak and what the device reports in use (vLLM's pools)
        import torch

        free, total = torch.cuda.mem_get_info()
        return max(torch.cuda.max_memory_allocated(), total - free) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args) -> dict:
    """One engine, in this process; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkit.rollout.base import SamplingParams
    from rlkit.registry import ROLLOUT_ENGINES

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device)
    extra = {}
    if args.engine == "vllm":
        extra = dict(model_path=args.model, **json.loads(args.engine_args or "{}"))
    eng = ROLLOUT_ENGINES.get(args.engine)(model=model, tokenizer=tok, config=None, samples_per_generate_call=args.prompts * args.samples, **extra)
    sync_s = None
    if args.engine == "vllm":
        ts = time.perf_counter()
        eng.sync_weights(model)
        sync_s = time.perf_counter() - ts
    ps = prompts(tok, args.prompts)
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    times, toks = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        out = eng.generate(ps, args.samples, sp)
        times.append(time.perf_counter() - t)
        toks.append(sum(len(c.token_ids) for row in out for c in row))
        if r == 0:
            first = time.perf_counter() - t0
    rest = list(zip(times[1:], toks[1:])) or list(zip(times, toks))
    res = {"engine": args.engine, "device": device, "first_batch_s": first, "call_s": statistics.median(t for t, _ in rest),
           "tokens_per_call": toks[-1], "tokens_per_s": statistics.median(n / t for t, n in rest),
           "peak_mem_mb": peak_memory_mb(device), "weight_sync_s": sync_s}
    if hasattr(eng, "close"):
        eng.close()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model directory (default: build --model-config)")
    ap.add_argument("--model-config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-args", default="", help="JSON rollout.engine_args for vllm, e.g. '{\"gpu_memory_utilization\": 0.5}'")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.engine = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    tmp = None
    if not args.model:
        tmp = tempfile.mkdtemp(prefix="rlkit-bench-")
        args.model = build_model(args.model_config, os.path.join(tmp, args.model_config))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    results = []
    for e in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", e, "--model", args.model, "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds),
               "--threads", str(args.threads), "--engine-args", args.engine_args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            sys.exit(f"{e} engine failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        results.append(json.loads(line[-1][len("RESULT "):]))
    hdr = f"{'engine':8s} {'device':6s} {'first batch s':>14s} {'s / call':>9s} {'tokens/call':>12s} {'tokens/s':>10s} {'peak mem MB':>12s} {'weight sync s':>14s}"
    print(f"model={args.model_config if tmp else args.model}  prompts={args.prompts} x samples={args.samples} x "
          f"{args.new_tokens} new tokens, {args.rounds} calls, threads={args.threads}")
    print(hdr)
    for r in results:
        ws = f"{r['weight_sync_s']:.3f}" if r["weight_sync_s"] is not None else "-"
        print(f"{r['engine']:8s} {r['device']:6s} {r['first_batch_s']:14.2f} {r['call_s']:9.3f} {r['tokens_per_call']:12d} "
              f"{r['tokens_per_s']:10.0f} {r['peak_mem_mb']:12.0f} {ws:>14s}")
    by = {r["engine"]: r for r in results}
    if "hf" in by and "vllm" in by:
        print(f"vllm / hf: tokens/s x{by['vllm']['tokens_per_s'] / by['hf']['tokens_per_s']:.2f}, "
              f"first batch x{by['vllm']['first_batch_s'] / by['hf']['first_batch_s']:.2f}, "
              f"peak memory x{by['vllm']['peak_mem_mb'] / by['hf']['peak_mem_mb']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
