"""The GPU check of asynchronous RL behind ``benchmarks/gpu_async.sh``: one summary, inside a time budget.

Nothing comes from a hub: the model is built here from a Qwen2-0.5B-class config (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, tied embeddings, vocabulary 151936, random init with seed 0, bf16) with the Qwen3
tokenizer at ``$RLKIT_QWEN3_TOKENIZER`` (or ``--tokenizer``; a directory with tokenizer.json + tokenizer_config.json).

Stages, each a subprocess with its own time limit (a failure or hang costs only its stage; one line per failure):

* ``build``: the model directory (in a temporary directory, not under ``--out``).
* ``gen``: generation tokens/s on the same prompts (exactly ``new_tokens`` per completion, EOS masked through
  ``min_new_tokens``): plain HF ``model.generate`` vs rlkit's HF engine (``decode: lean``, the default, and
  ``decode: generate``), interleaved call by call.  vLLM is not installed on the device machine (its wheel pins
  another torch), so the vLLM rows say "not available" unless ``vllm`` imports.
* ``grpo_k0`` / ``grpo_k1``: a few GRPO steps at ``rollout.max_staleness`` 0 and 1 (one local rollout worker on the
  same GPU), a simple reward (the share of digit characters: the model is random, the point is time), seconds per step
  (median over the steps after the first ``--warmup``) and the trainer's ``time/*`` split (rollout, reward, train,
  wait_for_rollout, weight_transfer, ...), the transport the workers used.
* ``transfer``: ``RolloutWorkers.push_weights`` of this model's weights to one worker (benchmarks/weight_transfer.py's
  ``measure``: a worker on the same GPU (CUDA IPC) and one on the CPU (gloo)), seconds the trainer is blocked, until
  delivered, and an exact checksum.

``--cpu`` (automatic without CUDA): the same stages with a 2-layer, hidden-64 model of the same family in fp32 and
tiny batches, in about a minute; that is the smoke test.  Usage:
``bash benchmarks/gpu_async.sh [--cpu] [--budget-s 220] [--out runs/gpu_async]``.
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
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, dtype="bfloat16",
                gen_prompts=32, gen_samples=4, gen_tokens=64, gen_repeats=3,
                prompts=16, samples=8, new_tokens=128, steps=6, warmup=2, lr=1e-6),
    "cpu": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=151936, dtype="float32",
                gen_prompts=4, gen_samples=2, gen_tokens=8, gen_repeats=2,
                prompts=4, samples=2, new_tokens=8, steps=4, warmup=1, lr=1e-4),
}
# stage -> (its share of --budget-s); spare time of a finished stage goes to the later ones
STAGES = [("build", 0.15), ("gen", 0.2), ("grpo_k0", 0.22), ("grpo_k1", 0.28), ("transfer", 0.15)]


def digit_reward(completions, **kwargs):
    """Share of digit characters in the completion (a dense, cheap reward; the model is random)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def prompts(n: int) -> List[str]:
    return [f"Question {i}: Tom has {3 + i} apples and buys {7 * i % 11 + 2} more. How many apples does he have now?"
            for i in range(n)]


def device_str() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() and not os.environ.get("RLKIT_GPU_ASYNC_CPU") else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ stages
def stage_build(a) -> Dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    s = SIZES[a.size]
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = Qwen2Config(vocab_size=max(s["vocab"], len(tok)), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                      tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dev = device_str()
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg)
    model.to(getattr(torch, s["dtype"]))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(a.model_dir)
    tok.save_pretrained(a.model_dir)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(a.model_dir)
    return {"params": n, "config": {k: s[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "dtype")},
            "vocab": cfg.vocab_size, "tokenizer_len": len(tok), "device_built_on": dev}


def _load(a):
    import torch

    from rlkit.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm(a.model_dir, dtype=SIZES[a.size]["dtype"]).to(device_str())
    tok = load_tokenizer(a.model_dir)
    return torch, model, tok


def stage_gen(a) -> Dict[str, Any]:
    torch, model, tok = _load(a)
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.hf import HFEngine

    s = SIZES[a.size]
    P, n, T = s["gen_prompts"], s["gen_samples"], s["gen_tokens"]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts(P)]
    model.generation_config.min_new_tokens = T          # EOS masked: every completion has exactly T tokens
    dev = next(model.parameters()).device
    L = max(len(x) for x in ids)
    pad = tok.pad_token_id
    inp = torch.tensor([[pad] * (L - len(x)) + x for x in ids for _ in range(n)], device=dev)
    att = (torch.arange(L, device=dev)[None, :] >= torch.tensor([L - len(x) for x in ids for _ in range(n)], device=dev)[:, None]).long()
    engines = {"rlkit hf (lean)": HFEngine(model, tok, samples_per_generate_call=P * n, decode="lean"),
               "rlkit hf (generate)": HFEngine(model, tok, samples_per_generate_call=P * n, decode="generate")}

    def plain(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=T, min_new_tokens=T, pad_token_id=pad)
        return int((out[:, L:] != -1).sum())

    def ours(name, seed):
        res = engines[name].generate(ids, n, SamplingParams(temperature=1.0, max_new_tokens=T, seed=seed))
        return sum(len(c.token_ids) for row in res for c in row)

    runs = {"HF generate (plain)": plain, **{k: (lambda seed, k=k: ours(k, seed)) for k in engines}}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    tokens: Dict[str, int] = {}
    t_stage = time.perf_counter()
    for name, fn in runs.items():       # warm-up (CUDA kernels, allocator), not timed
        fn(0)
    for r in range(s["gen_repeats"]):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            sync()
            t = time.perf_counter()
            tokens[name] = runs[name](r + 1)
            sync()
            times[name].append(time.perf_counter() - t)
        if time.perf_counter() - t_stage > 0.7 * a.stage_budget:
            break
    out = {name: {"s_per_call": statistics.median(ts), "tokens": tokens[name], "tok_per_s": tokens[name] / statistics.median(ts),
                  "calls": len(ts)} for name, ts in times.items()}
    return {"prompts": P, "samples": n, "new_tokens": T, "engines": out}


def stage_grpo(a) -> Dict[str, Any]:
    import torch

    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    s = SIZES[a.size]
    k = a.k
    over = {"model.name_or_path": a.model_dir, "model.dtype": s["dtype"], "data.prompt_field": "question",
            "data.answer_field": "answer", "data.max_prompt_tokens": 64, "rollout.samples_per_prompt": s["samples"],
            "rollout.max_new_tokens": s["new_tokens"], "rollout.temperature": 1.0,
            "reward.functions": f"[{Path(__file__).resolve()}:digit_reward]", "reward.isolation": "none",
            "algorithm.kl.coef": 0.0, "trainer.prompts_per_step": s["prompts"], "trainer.ppo_epochs": 1,
            "trainer.total_steps": s["steps"], "trainer.lr": s["lr"], "trainer.lr_schedule": "constant",
            "trainer.output_dir": a.out, "trainer.run_name": f"grpo_k{k}", "trainer.progress_bar": False,
            "trainer.log_with": "[]", "trainer.save_final": False, "trainer.log_completions": False}
    if k:
        over.update({"rollout.max_staleness": k, "rollout.num_workers": 1})
    ov = [f"{x}={y}" for x, y in over.items()]
    rows = [{"question": p, "answer": "0"} for p in prompts(4 * s["prompts"])]
    t0 = time.perf_counter()
    tr = Trainer(load_config(ov), train_rows=rows)
    setup_s = time.perf_counter() - t0
    walls, mets = [], []
    t_stage = time.perf_counter()
    transport = None
    try:
        for i in range(s["steps"]):
            sync()
            t = time.perf_counter()
            m = tr.step()
            sync()
            walls.append(time.perf_counter() - t)
            mets.append({x: float(y) for x, y in m.items() if isinstance(y, (int, float))})
            print(f"k={k} step {i + 1}: {walls[-1]:.3f}s", flush=True)
            left = a.stage_budget - (time.perf_counter() - t_stage) - setup_s
            if i + 1 > s["warmup"] and left < 2 * walls[-1] + 10:    # stop while the stage can still report
                break
        w = getattr(getattr(tr, "rollouts", None), "workers", None)
        transport = getattr(w, "backend", None) if w is not None else None
    finally:
        close = getattr(getattr(tr, "rollouts", None), "close", None)
        if callable(close):
            close()
    timed = list(range(min(s["warmup"], len(walls) - 1), len(walls)))
    keys = sorted({x for m in mets for x in m if x.startswith("time/")})
    split = {x[5:]: statistics.median([mets[i][x] for i in timed if x in mets[i]]) for x in keys
             if any(x in mets[i] for i in timed)}
    return {"k": k, "steps": len(walls), "timed_steps": len(timed), "setup_s": setup_s, "step_wall": walls,
            "s_per_step": statistics.median([walls[i] for i in timed]), "split": split, "transport": transport,
            "staleness": [m.get("async/staleness") for m in mets], "reward_mean": [m.get("reward/mean") for m in mets],
            "logprob_gap_mean": [m.get("logprob_gap/mean") for m in mets],
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "overrides": ov}


def stage_transfer(a) -> Dict[str, Any]:
    torch, model, tok = _load(a)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_transfer import measure

    named = [(n, p.detach()) for n, p in model.named_parameters()]
    dev = device_str()
    plans = [("auto", None), ("cpu", "gloo")] if dev.startswith("cuda") else [("auto", "shm"), ("auto", "gloo")]
    out = []
    t_stage = time.perf_counter()
    for worker_device, transport in plans:
        try:
            r = measure(named, worker_device, dev, 3, transport)
            r.update(worker_device=worker_device, params=sum(t.numel() for _, t in named))
            r.pop("seconds_all", None)
            out.append(r)
        except Exception as e:  # noqa: BLE001 - one line per failed plan
            out.append({"worker_device": worker_device, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        if time.perf_counter() - t_stage > 0.6 * a.stage_budget:
            break
    return {"plans": out}


STAGE_FNS = {"build": stage_build, "gen": stage_gen, "grpo_k0": stage_grpo, "grpo_k1": stage_grpo, "transfer": stage_transfer}


# ------------------------------------------------------------------------------------------------------ driver
def run_stage(name: str, a, timeout_s: float, env: Dict[str, str]) -> Dict[str, Any]:
    out = Path(a.out)
    res = out / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--size", a.size, "--model-dir", a.model_dir,
           "--tokenizer", a.tokenizer, "--out", str(out), "--result", str(res), "--stage-budget", str(timeout_s),
           "--k", "1" if name == "grpo_k1" else "0"]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(5.0, timeout_s))
        (out / f"{name}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            lines = [ln for ln in (p.stdout + p.stderr).strip().splitlines() if ln.strip()]
            err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
            return {"error": f"exit {p.returncode}: {err.strip()[:300]}", "wall_s": time.perf_counter() - t}
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        (out / f"{name}.log").write_text(log + ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes)
                                                else (e.stderr or "")))
        return {"error": f"timed out after {timeout_s:.0f}s (its time budget)", "wall_s": time.perf_counter() - t}
    r = json.loads(res.read_text())
    r["wall_s"] = time.perf_counter() - t
    return r


def f(x, d=3):
    return "-" if x is None else f"{x:.{d}f}"


def summarize(results: Dict[str, Any], a, wall_s: float) -> str:
    L = [f"# rlkit gpu_async ({a.size} mode)", "",
         f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wall {wall_s:.0f} s (budget {a.budget_s:.0f} s); {a.device}",
         f"- command: bash benchmarks/gpu_async.sh {' '.join(a.passthrough)}".rstrip()]
    b = results.get("build", {})
    if "error" in b:
        L.append(f"- model: ERROR {b['error']}")
    elif b:
        c = b["config"]
        L.append(f"- model: Qwen2ForCausalLM built locally, random init (seed 0), {b['params'] / 1e6:.0f}M params, hidden "
                 f"{c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, intermediate "
                 f"{c['intermediate']}, vocab {b['vocab']}, tied embeddings, {c['dtype']}; tokenizer {a.tokenizer}")
    L += ["", "## Generation tokens/s (same prompts, exactly the same number of new tokens)", ""]
    g = results.get("gen")
    if g is None:
        L.append("- not run (time budget)")
    elif "error" in g:
        L.append(f"- ERROR {g['error']}")
    else:
        L += [f"{g['prompts']} prompts x {g['samples']} samples x {g['new_tokens']} new tokens, temperature 1, interleaved "
              "calls, median over the calls after one warm-up call each", "",
              "| engine | s / call | tokens | tokens/s | vs HF generate |", "|---|---|---|---|---|"]
        base = g["engines"].get("HF generate (plain)", {}).get("tok_per_s")
        for name, e in g["engines"].items():
            L.append(f"| {name} | {e['s_per_call']:.3f} | {e['tokens']} | {e['tok_per_s']:.0f} | "
                     f"{f(e['tok_per_s'] / base, 2) + 'x' if base else '-'} |")
        L.append(f"| vLLM (rlkit engine / standalone) | {a.vllm} | | | |")
    L += ["", "## GRPO seconds per step at k = 0 and k = 1 (time split by stage, medians, seconds)", ""]
    rows = [(x, results.get(f"grpo_k{x}")) for x in (0, 1)]
    keys = sorted({key for _, r in rows if r and "split" in r for key in r["split"]})
    L += ["| k | steps (timed) | s / step | transport | " + " | ".join(keys) + " |",
          "|---|---|---|---|" + "---|" * len(keys)]
    for x, r in rows:
        if r is None:
            L.append(f"| {x} | not run (time budget) |")
        elif "error" in r:
            L.append(f"| {x} | ERROR {r['error']} |")
        else:
            L.append(f"| {x} | {r['steps']} ({r['timed_steps']}) | {r['s_per_step']:.3f} | {r.get('transport') or '-'} | "
                     + " | ".join(f(r["split"].get(key)) for key in keys) + " |")
    r0, r1 = rows[0][1], rows[1][1]
    if r0 and r1 and "s_per_step" in r0 and "s_per_step" in r1:
        L.append(f"\nthroughput k=1 / k=0: **{r0['s_per_step'] / r1['s_per_step']:.2f}x** (median s/step "
                 f"{r0['s_per_step']:.3f} / {r1['s_per_step']:.3f}); at k=1 `rollout` and `reward` are the worker's time, "
                 "overlapped with training; the trainer waits `wait_for_rollout`")
    if a.size == "gpu":
        s = SIZES["gpu"]
        L.append(f"\nGRPO workload: {s['prompts']} prompts x {s['samples']} samples x {s['new_tokens']} new tokens, reward "
                 "= share of digit characters, lr 1e-6, one optimizer step per RL step, rlkit HF engine (decode: lean)")
    L += ["", "## Weight transfer trainer -> worker (`RolloutWorkers.push_weights`, this model's weights)", ""]
    t = results.get("transfer")
    if t is None:
        L.append("- not run (time budget)")
    elif "error" in t:
        L.append(f"- ERROR {t['error']}")
    else:
        L += ["| worker device | transport | GB | push s | GB/s | delivered s | exact |", "|---|---|---|---|---|---|---|"]
        for p in t["plans"]:
            if "error" in p:
                L.append(f"| {p['worker_device']} | ERROR {p['error']} | | | | | |")
            else:
                L.append(f"| {p['worker_device']} | {p['transport']} | {p['bytes'] / 1e9:.2f} | {p['seconds']:.4f} | "
                         f"{p['gbps']:.1f} | {p['delivered_s']:.4f} | {p['exact']} |")
    fails = [f"- {k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if fails:
        L += ["", "## Failures", ""] + fails
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all stages (default 220; 600 with --cpu)")
    p.add_argument("--out", default="runs/gpu_async")
    p.add_argument("--tokenizer", default=os.environ.get("RLKIT_QWEN3_TOKENIZER", str(REPO.parent / "shared" / "tokenizers" / "qwen3")))
    p.add_argument("--stages", default=",".join(n for n, _ in STAGES))
    # internal (one stage in this process)
    p.add_argument("--stage", choices=list(STAGE_FNS))
    p.add_argument("--size", default="gpu", choices=list(SIZES))
    p.add_argument("--model-dir")
    p.add_argument("--result")
    p.add_argument("--stage-budget", type=float, default=60.0)
    p.add_argument("--k", type=int, default=0)
    a = p.parse_args()
    if a.stage:
        if a.size == "cpu":
            os.environ["RLKIT_GPU_ASYNC_CPU"] = "1"
        import torch

        torch.manual_seed(0)
        res = STAGE_FNS[a.stage](a)
        Path(a.result).write_text(json.dumps(res, indent=1, default=str))
        return 0
    t0 = time.perf_counter()
    a.passthrough = sys.argv[1:]
    if a.budget_s is None:
        a.budget_s = 600.0 if a.cpu else 220.0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    a.out = str(out)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _rlkit_env import rlkit_env

    env = rlkit_env()
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        cuda = torch.cuda.is_available()
        a.size = "cpu" if a.cpu or not cuda else "gpu"
        a.device = (f"{torch.cuda.get_device_name(0)}" if cuda and a.size == "gpu" else f"CPU ({os.cpu_count()} cores)") + \
            f", torch {torch.__version__}"
        import transformers

        a.device += f", transformers {transformers.__version__}"
    except Exception as e:  # noqa: BLE001
        a.size, a.device = "cpu", f"unknown ({type(e).__name__}: {e})"
    try:
        import vllm  # noqa: F401

        a.vllm = f"vllm {vllm.__version__} importable, not measured by this script (HF engine only)"
    except Exception:  # noqa: BLE001
        a.vllm = "not available on the device (vllm not installed; its wheel pins another torch), so not measured"
    if not (Path(a.tokenizer) / "tokenizer.json").exists():
        print(f"error: tokenizer {a.tokenizer} has no tokenizer.json (set RLKIT_QWEN3_TOKENIZER or --tokenizer)")
        return 2
    if a.size == "cpu":   # a second thread only spins on a busy 2-core machine (docs/benchmarks.md, step_time)
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"gpu_async: {a.size} mode, {a.device}; budget {a.budget_s:.0f} s; out {out}", flush=True)
    wanted = a.stages.split(",")
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rlkit_gpu_async_model_") as mdir:
        a.model_dir = mdir
        plan = [(n, share) for n, share in STAGES if n in wanted]
        for i, (name, share) in enumerate(plan):
            left = a.budget_s - (time.perf_counter() - t0)
            later = sum(sh for _, sh in plan[i + 1:]) * a.budget_s
            timeout = min(left, max(share * a.budget_s, left - later))
            if timeout < 5 or (name != "build" and "error" in results.get("build", {})):
                results[name] = {"error": "skipped: " + ("no time left in --budget-s" if timeout < 5 else "no model (build failed)")}
            else:
                results[name] = run_stage(name, a, timeout, env)
            r = results[name]
            print(f"stage {name}: " + (f"FAILED {r['error']}" if "error" in r else f"ok in {r['wall_s']:.0f} s"), flush=True)
    summary = summarize(results, a, time.perf_counter() - t0)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({"device": a.device, "size": a.size, "budget_s": a.budget_s,
                                                  "results": results}, indent=1, default=str))
    print(f"wrote {out / 'summary.md'} and summary.json\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
