#!/usr/bin/env bash
# The GPU check of asynchronous RL (issue 11), <= 4 minutes on one GPU, one summary (--out DIR/summary.md + .json):
#   generation tokens/s of rlkit's HF engine vs plain HF generate on the same prompts; weight transfer trainer ->
#   rollout worker (RolloutWorkers.push_weights, with its transport); GRPO seconds per step at rollout.max_staleness
#   0 and 1, split by stage.  The model is built here from a Qwen2-0.5B-class config (random init, bf16) with the
#   Qwen3 tokenizer at $RLKIT_QWEN3_TOKENIZER; nothing comes from a hub and nothing is pip-installed.
# Usage:  bash benchmarks/gpu_async.sh [--cpu] [--budget-s 220] [--out runs/gpu_async]
#   --cpu (automatic without CUDA): a 2-layer model of the same family in fp32, tiny batches (the smoke test).
# Every stage runs under its share of --budget-s; a failed stage is one line in the summary, the others still report.
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PY="$(command -v python || command -v python3)"
exec "$PY" benchmarks/gpu_async.py "$@"
