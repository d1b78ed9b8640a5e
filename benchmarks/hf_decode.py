#!/usr/bin/env python
"""The HF rollout engine's two decode paths side by side: ``lean`` (rlkit's loop) vs ``generate`` (HF generate).

    python benchmarks/hf_decode.py                        # toy:tiny and stories260K (if ../shared has it), 1 thread
    python benchmarks/hf_decode.py --repeats 15 --threads 1 --json OUT
    python benchmarks/hf_decode.py --profile              # + where a call's time goes (cProfile, top functions)
    python benchmarks/hf_decode.py --only lean            # one path only (for whole-process A/B timing)
    python benchmarks/hf_decode.py --models "" --steps 12 # whole GRPO steps (toy:tiny) with each path

Workload (the benchmarks' rollout): ``--prompts`` 8 echo prompts x ``--samples`` 8 = 64 completions, at most
``--new-tokens`` 48 new tokens, temperature 1, seed 0, one ``HFEngine.generate`` call, ``torch.set_num_threads``
``--threads``.  Two length regimes per model:

* ``fixed``: the model's ``generation_config.min_new_tokens = --new-tokens`` masks EOS (as benchmarks/step_time.py
  does), so both paths run exactly the same batch for the same number of steps and draw the same tokens (checked:
  the script exits 1 if they differ);
* ``natural``: EOS ends rows; the lean loop drops finished rows from the batch, generate keeps running them.

Both paths run in this one process, interleaved call by call (the order alternates every repeat), so load from
other processes hits both alike.  Reported per path: min and median seconds per call, generated tokens, the share
of the call spent inside the model's forward (a forward hook's wall clock), and the median over repeats of the
pairwise ratio ``generate s / lean s`` (> 1: lean is faster).  ``--steps N`` adds whole rlkit GRPO steps (two
Trainers from the same toy:tiny weights, one per path, stepped alternately; EOS masked so every completion has
``--new-tokens`` tokens; the first step of each is warm-up).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("generate", "lean")
STORIES = REPO.parent / "shared" / "models" / "stories260K-hf"


class ForwardClock:
    """Wall seconds spent inside ``model.forward`` (pre- and post-forward hooks on the top module)."""

    def __init__(self, model):
        self.total, self._t = 0.0, None
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t


def run_model(name: str, args) -> list:
    import torch

    from rlkit.modeling import load_causal_lm, load_tokenizer
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.hf import HFEngine
    from rlkit.toy import echo_rows, resolve

    path = resolve(name) if name.startswith("toy:") else name
    tok, model = load_tokenizer(path), load_causal_lm(path)
    clock = ForwardClock(model)
    prompts = [tok(r["question"])["input_ids"] for r in echo_rows(args.prompts, seed=0)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    modes = [args.only] if args.only else list(MODES)
    engines = {m: HFEngine(model, tok, decode=m) for m in modes}
    rows = []
    for regime in ("fixed", "natural"):
        model.generation_config.min_new_tokens = args.new_tokens if regime == "fixed" else None
        times = {m: [] for m in modes}
        fwd = {m: [] for m in modes}
        outs = {}
        for m in modes:  # warm-up
            outs[m] = engines[m].generate(prompts, args.samples, sp)
        if regime == "fixed" and len(modes) == 2:
            same = [[c.token_ids for c in r] for r in outs["lean"]] == [[c.token_ids for c in r] for r in outs["generate"]]
            if not same:
                print(f"{name} fixed: lean and generate drew different tokens", file=sys.stderr)
                sys.exit(1)
        for rep in range(args.repeats):
            for m in (modes if rep % 2 == 0 else modes[::-1]):
                clock.total = 0.0
                t = time.perf_counter()
                out = engines[m].generate(prompts, args.samples, sp)
                times[m].append(time.perf_counter() - t)
                fwd[m].append(clock.total / times[m][-1])
                outs[m] = out
        for m in modes:
            row = {"model": name.split("/")[-1], "regime": regime, "decode": m, "min_s": min(times[m]),
                   "median_s": statistics.median(times[m]), "tokens": sum(len(c.token_ids) for r in outs[m] for c in r),
                   "forward_share": statistics.median(fwd[m]), "times": times[m]}
            if len(modes) == 2 and m == "lean":
                row["speedup_generate_over_lean"] = statistics.median(g / lean for g, lean in zip(times["generate"], times["lean"]))
            rows.append(row)
        if args.profile:
            for m in modes:
                pr = cProfile.Profile()
                pr.enable()
                engines[m].generate(prompts, args.samples, sp)
                pr.disable()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
                print(f"\n=== profile {name} {regime} decode={m} (top functions by own time)")
                print("\n".join(line[:150] for line in s.getvalue().splitlines()[4:] if line.strip()))
    model.generation_config.min_new_tokens = None
    return rows


def step_ab(args) -> list:
    """Whole GRPO steps: two rlkit Trainers from the same toy weights, ``decode: lean`` and ``decode: generate``,
    stepped alternately; EOS masked by ``min_new_tokens`` so both generate ``--new-tokens`` tokens per completion."""
    import tempfile

    import torch
    from transformers import GenerationConfig

    from rlkit.config import load_config
    from rlkit.toy import echo_rows, make_model_dir
    from rlkit.trainer import Trainer

    root = tempfile.mkdtemp(prefix="rlkit-hfdecode-")
    path = make_model_dir(os.path.join(root, "toy-tiny"), "tiny", seed=0)
    gc = GenerationConfig.from_pretrained(path)
    gc.min_new_tokens = args.new_tokens
    gc.save_pretrained(path)
    trainers, times, gaps = {}, {m: [] for m in MODES}, {m: [] for m in MODES}
    for m in MODES:
        o = {"model.name_or_path": path, "data.prompt_field": "question", "data.answer_field": "answer",
             "data.max_prompt_tokens": 64, "rollout.samples_per_prompt": args.samples, "rollout.max_new_tokens": args.new_tokens,
             "rollout.engine_args": "{decode: %s}" % m, "reward.functions": f"[{REPO}/rewards/toy.py:echo]",
             "trainer.prompts_per_step": args.prompts, "trainer.total_steps": args.steps + 2, "trainer.lr": 1e-3,
             "trainer.output_dir": os.path.join(root, m), "trainer.run_name": "b", "trainer.progress_bar": False,
             "trainer.log_with": "[]", "trainer.save_final": False, "trainer.log_completions": False}
        trainers[m] = Trainer(load_config([f"{k}={v}" for k, v in o.items()]), train_rows=echo_rows(512, seed=0))
    for i in range(args.steps + 1):
        for m in (MODES if i % 2 == 0 else MODES[::-1]):
            torch.set_num_threads(args.threads)
            t = time.perf_counter()
            met = trainers[m].step()
            if i:  # step 0 is warm-up
                times[m].append(time.perf_counter() - t)
                gaps[m].append(met.get("logprob_gap/mean"))
    rows = [{"model": "toy:tiny", "regime": "GRPO step", "decode": m, "min_s": min(times[m]),
             "median_s": statistics.median(times[m]), "tokens": args.prompts * args.samples * args.new_tokens,
             "forward_share": float("nan"), "times": times[m], "logprob_gap_max": max(gaps[m])} for m in MODES]
    rows[1]["speedup_generate_over_lean"] = statistics.median(g / lean for g, lean in zip(times["generate"], times["lean"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="toy:tiny,stories260K", help="comma list: toy:<size>, stories260K, or a model dir")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=MODES)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steps", type=int, default=0, help="also time this many whole GRPO steps per path (toy:tiny)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for name in filter(None, args.models.split(",")):
        if name == "stories260K":
            if not STORIES.exists():
                print(f"skipping stories260K: {STORIES} is absent")
                continue
            name = str(STORIES)
        rows += run_model(name, args)
    if args.steps:
        rows += step_ab(args)
    print(f"\n{args.prompts} prompts x {args.samples} samples, <= {args.new_tokens} new tokens, {args.repeats} interleaved "
          f"repeats per call row, {args.steps} per GRPO-step row, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch {torch.__version__}")
    print(f"{'model':16} {'regime':9} {'decode':9} {'min s':>7} {'median s':>9} {'tokens':>7} {'fwd share':>9} {'gen/lean':>9}")
    for r in rows:
        sp = r.get("speedup_generate_over_lean")
        print(f"{r['model']:16} {r['regime']:9} {r['decode']:9} {r['min_s']:7.3f} {r['median_s']:9.3f} {r['tokens']:7d} "
              f"{'-' if r['forward_share'] != r['forward_share'] else format(r['forward_share'], '.0%'):>9} {'' if sp is None else f'{sp:.2f}x':>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
