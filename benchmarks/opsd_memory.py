"""Peak memory and step time: OPSD (self-distillation) vs OPD (a separate teacher 4x the student's size).

    python benchmarks/opsd_memory.py                        # student toy:large (10.5M), teacher toy:xl (42M)
    python benchmarks/opsd_memory.py --student toy:medium --teacher toy:large      # 2.6M / 10.5M, faster
    python benchmarks/opsd_memory.py --steps 6 --new-tokens 128 --prompts 16

Same student, same batch: every configuration runs in a fresh process with the same seed, prompts and
``trainer.lr=1e-30`` (the optimizer steps and holds its state, the weights do not move), so every step samples exactly the same
completions in every configuration; only the teacher differs:

* ``opsd``: the teacher is the student's initial weights reading a privileged prompt (``answer: x ...``).  With
  LoRA (the OPSD recipe) that is the base model with the adapters disabled, no copy; with a full fine-tune
  (``--full``) a frozen copy of the initial weights.
* ``opd``: a separate frozen teacher, ``toy:xl`` (hidden 1024 vs 512, 4x the parameters, same tokenizer),
  reading the student's own prompt.
* ``none``: no distillation (advantage zero, no regularizer): the part both share.

What "memory" is here (CPU: no allocator statistics like ``torch.cuda.max_memory_allocated``):

* **tensor peak**: the bytes of the weights held before the first step (the student, and the
  frozen teacher, which the script loads up front: OPD's model or, with ``--full``, OPSD's copy) plus the peak of
  live tensor bytes during the ``--warmup`` steps, from ``torch.profiler`` with ``profile_memory=True`` (every
  allocation and free of the CPU allocator, summed in time order, each op's at its start; the optimizer state,
  created in the first step, carries into the second).  This is the quantity a GPU's allocator peak measures,
  without the caching allocator's slack and fragmentation.

It is not the GPU number the paper's claim is about (no CUDA caching allocator, fp32, and the [tokens x vocab]
logits that dominate real models are small here: vocabulary 46), so weights and activations decide.

Step time: median wall seconds of the unprofiled ``Trainer.step()`` calls after the ``--warmup`` steps (rollout +
teacher pass + loss + optimizer), one torch thread; the configurations run one after another, so load from other
processes on a shared machine is not shared evenly (compare with ``benchmarks/method_overhead.py``, which alternates).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from rlkit.config import load_config
    from rlkit.toy import echo_rows, resolve
    from rlkit.trainer import Trainer

    resolve(a.student)
    resolve(a.teacher)                # built before the baseline (a toy model is written to disk once)
    if a.mode == "opsd":
        reg = "{name: opsd, teacher: initial, clip: 0.05, teacher_template: 'answer: {answer} {question}'}"
    elif a.mode == "opd":
        reg = f"{{name: opd, teacher_path: '{a.teacher}'}}"
    else:  # no distillation: what the student's own training costs (the common part of both)
        reg = ""
    out = tempfile.mkdtemp()
    args = [f"recipe={os.path.join(REPO, 'recipes', 'opsd.yaml')}", "profile=tiny", f"model.name_or_path={a.student}",
            f"model.lora.enabled={'false' if a.full else 'true'}", f"algorithm.regularizers=[{reg}]",
            f"trainer.prompts_per_step={a.prompts}", "rollout.samples_per_prompt=1", f"rollout.max_new_tokens={a.new_tokens}",
            "trainer.lr=1e-30", f"trainer.total_steps={a.warmup + a.steps}", f"trainer.output_dir={out}",
            "trainer.save_final=false", f"trainer.logprob_chunk_size={a.chunk}", "trainer.tokens_per_microbatch=65536"]
    cfg = load_config(args)
    tr = Trainer(cfg, train_rows=echo_rows(512, seed=0))
    reg = tr.regularizers[0] if tr.regularizers else None
    if reg is not None and (a.mode == "opd" or a.full):   # load the frozen teacher now (it loads lazily otherwise)
        reg._frozen = reg._load_initial(tr.unwrapped_lm)
    teacher = reg._frozen if reg is not None else None

    def nbytes(mod):
        return 0 if mod is None else sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))

    resident = nbytes(tr.unwrapped_lm) + nbytes(teacher)      # weights held before the first step
    times, lengths, peak_dyn, carried = [], [], 0, 0
    for i in range(a.warmup + a.steps):
        if i < a.warmup:   # memory: the warm-up steps under the profiler (optimizer state appears in the 1st step)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                m = tr.step()
            live = run = 0
            for e in sorted(prof.events(), key=lambda e: e.time_range.start):
                live += e.self_cpu_memory_usage   # allocations (+) and frees (-) of tensor memory, op by op
                run = max(run, live)
            peak_dyn = max(peak_dyn, carried + run)
            carried += live                       # still alive after the step (optimizer state, caches)
        else:              # time: unprofiled steps
            t = time.perf_counter()
            m = tr.step()
            times.append(time.perf_counter() - t)
        lengths.append(float(m.get("response_length/mean", 0.0)) if isinstance(m, dict) else 0.0)
    return {"mode": a.mode, "full": a.full, "tensor_peak_mb": (resident + peak_dyn) / 2**20, "resident_mb": resident / 2**20,
"step_s": statistics.median(times), "step_s_all": times,
            "student_params": sum(p.numel() for p in tr.unwrapped_lm.parameters()),
            "teacher_params_extra": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
            "response_length": lengths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="toy:large")
    ap.add_argument("--teacher", default="toy:xl", help="OPD's teacher (same tokenizer; default 4x the student)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="profiled steps (memory); >= 2 so that the optimizer state exists")
    ap.add_argument("--chunk", type=int, default=256, help="trainer.logprob_chunk_size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA (OPSD's teacher is then a copy)")
    ap.add_argument("--mode", choices=["none", "opsd", "opd"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args()
    if a.mode:  # a worker process
        print("RESULT " + json.dumps(worker(a)))
        return
    import torch

    print(f"student {a.student}, OPD teacher {a.teacher}; {a.prompts} prompts x 1 sample, up to {a.new_tokens} new "
          f"tokens; {a.steps} timed steps after {a.warmup}; torch {torch.__version__}, {a.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f}")
    res = []
    for full in ([a.full] if a.full else [False, True]):
        for mode in ("none", "opsd", "opd"):
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--student", a.student, "--teacher", a.teacher,
                   "--prompts", str(a.prompts), "--new-tokens", str(a.new_tokens), "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--chunk", str(a.chunk), "--threads", str(a.threads)] + (["--full"] if full else [])
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"worker {mode} failed:\n{p.stderr[-3000:]}")
            res.append(json.loads(line[0][7:]))
    print(f"\n{'setup':<24} {'tensor peak MB':>15} {'step s (median)':>16} {'teacher params':>15} {'resp len':>9}")
    for r in res:
        label = {"none": "no distillation", "opsd": "OPSD", "opd": "OPD"}[r["mode"]]
        name = f"{label} {'full FT' if r['full'] else 'LoRA'}"
        print(f"{name:<24} {r['tensor_peak_mb']:>15.1f} {r['step_s']:>16.3f} {r['teacher_params_extra']:>15,} "
              f"{statistics.mean(r['response_length']):>9.1f}")
    print()
    for full in sorted({r["full"] for r in res}):
        o = next(r for r in res if r["full"] == full and r["mode"] == "opsd")
        d = next(r for r in res if r["full"] == full and r["mode"] == "opd")
        z = next(r for r in res if r["full"] == full and r["mode"] == "none")
        mem = o["tensor_peak_mb"] / d["tensor_peak_mb"]
        extra_o, extra_d = o["tensor_peak_mb"] - z["tensor_peak_mb"], d["tensor_peak_mb"] - z["tensor_peak_mb"]
        print(f"{'full FT' if full else 'LoRA'}: OPSD / OPD tensor peak = {mem:.2f} (OPSD saves {100 * (1 - mem):.0f}%); "
              f"above no distillation: OPSD {extra_o:+.1f} MB, OPD {extra_d:+.1f} MB"
              + (f" (ratio {extra_o / extra_d:.2f})" if extra_d > 0 else "")
              + f"; step time OPSD / OPD = {o['step_s'] / d['step_s']:.2f}; same completions: "
              f"{o['response_length'] == d['response_length'] == z['response_length']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
