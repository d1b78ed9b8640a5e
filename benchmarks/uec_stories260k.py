"""Entropy trajectories on the pretrained stories260K: plain GRPO vs EFRame vs UEC (EFRame + the uec controller).

Task: 4 story openings, 8 samples of 12 tokens, reward = fraction of words equal to "the"
(tests/story_rewards.py:the_frac).  Prints one line per step: the rollout entropy (``eframe/rollout_entropy``, the
uec controller's signal; the GRPO run uses EFRame's rollout strategy with 0 exploration samples and no filter, so it
logs the same signal), the smoothed signal (the controller's law, EMA ``--ema``, recomputed here for the runs
without a controller), whether it is inside the band, the controller's knobs, and whether an update happened; then
the fraction of steps after ``--warmup`` whose smoothed entropy is inside the band.  The band is relative,
``[--low, --high] x`` the first step's entropy (the same for every mode: same seed, same first rollout).
Needs ../shared/models/stories260K-hf.  tests/test_uec.py imports ``overrides`` / ``in_band_fraction``.

    OMP_NUM_THREADS=1 python benchmarks/uec_stories260k.py --mode grpo
    OMP_NUM_THREADS=1 python benchmarks/uec_stories260k.py --mode efr
    OMP_NUM_THREADS=1 python benchmarks/uec_stories260k.py --mode uec
    OMP_NUM_THREADS=1 python benchmarks/uec_stories260k.py --mode uec --coef-step 0    # the three EFRame knobs only
    OMP_NUM_THREADS=1 python benchmarks/uec_stories260k.py --mode uec --keep-zero-adv --seed 1

The measured table (GRPO / EFRame / UEC variants x seeds 42 and 1) and what it shows are in docs/methods/uec.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO.parent / "shared" / "models" / "stories260K-hf"
PROMPTS = ["Once upon a time, there was a little girl named Lily.", "One day, a boy named Tom went to the park.",
           "The sun was shining and the birds were singing.", "There was a big dog who liked to play.",
           "Sara had a red ball.", "Ben and his mom went to the store.", "A little cat sat on the mat.",
           "The bird flew over the tree."]
ROWS = [{"question": p, "answer": "the"} for p in PROMPTS]
DEFAULTS = dict(steps=30, lr=3e-3, low=0.6, high=1.2, ema=0.5, explore=8, coef_step=0.05, coef_max=0.5,
                keep_truncated_positive=True, samples=8, prompts=4, new_tokens=12, seed=42, keep_zero_adv=False, coef_gain=0.0)


def overrides(mode: str, model: Path = MODEL, out_dir: str = "", **kw) -> List[str]:
    """Config overrides for one run (``mode`` in grpo / efr / uec; keyword arguments as in ``DEFAULTS``)."""
    a = {**DEFAULTS, **kw}
    ov = {"model.name_or_path": str(model), "data.prompt_field": "question", "data.answer_field": "answer",
          "data.max_prompt_tokens": 32, "rollout.samples_per_prompt": a["samples"], "rollout.max_new_tokens": a["new_tokens"],
          "reward.functions": f"[{REPO / 'tests' / 'story_rewards.py'}:the_frac]", "trainer.prompts_per_step": a["prompts"],
          "trainer.total_steps": a["steps"], "trainer.lr": a["lr"], "trainer.output_dir": out_dir or tempfile.mkdtemp(),
          "trainer.run_name": mode, "trainer.progress_bar": False, "trainer.log_with": "[]",
          "trainer.save_final": False, "trainer.seed": a["seed"], "rollout.strategy": "{name: eframe, explore_samples: 0}"}
    if mode != "grpo":
        ov["rollout.strategy"] = f"{{name: eframe, explore_samples: {a['explore']}, explore_temperature: 1.2}}"
        ov["algorithm.filters"] = (f"[{{name: eframe_filter, replay_freq: 2, "
                                   f"drop_truncated_positive: {str(not a['keep_truncated_positive']).lower()}}}]")
    if mode == "uec":
        ov["algorithm.controllers"] = (f"[{{name: uec, relative: true, entropy_low: {a['low']}, entropy_high: {a['high']}, "
                                       f"ema: {a['ema']}, entropy_coef_step: {a['coef_step']}, entropy_coef_min: 0.0, "
                                       f"entropy_coef_max: {a['coef_max']}, entropy_coef_gain: {a['coef_gain']}, "
                                       f"keep_zero_adv_below: {str(a['keep_zero_adv']).lower()}, "
                                       f"probe_samples: 0}}]")
    return [f"{k}={v}" for k, v in ov.items()]


def smoothed(trace: Sequence[float], ema: float) -> List[float]:
    """The controller's smoothing law ``S_t = ema S_{t-1} + (1 - ema) H_t``, ``S_1 = H_1``."""
    out: List[float] = []
    for h in trace:
        out.append(h if not out else ema * out[-1] + (1 - ema) * h)
    return out


def in_band_fraction(trace: Sequence[float], low: float, high: float, ema: float, warmup: int) -> float:
    """Fraction of steps after ``warmup`` whose smoothed entropy lies in ``[low, high] x S_1``."""
    s = smoothed(trace, ema)
    lo, hi = low * s[0], high * s[0]
    tail = s[warmup:]
    return sum(lo <= x <= hi for x in tail) / max(len(tail), 1)


def run(mode: str, steps: int, verbose: bool = True, out_dir: str = "", **kw) -> List[Dict[str, float]]:
    from rlkit.config import load_config
    from rlkit.trainer import Trainer

    tr = Trainer(load_config(overrides(mode, out_dir=out_dir, steps=steps, **kw)), train_rows=ROWS)
    rows = []
    keys = ["reward/mean", "eframe/rollout_entropy", "uec/entropy_smoothed", "uec/band_state", "uec/entropy_coef",
            "uec/explore_temperature", "uec/explore_samples", "uec/replay_freq", "eframe/update", "eframe/hard_prompts"]
    for _ in range(steps):
        m = tr.step()
        rows.append(m)
        if verbose:
            print(f"step {tr.step_idx:3d} " + " ".join(f"{k.split('/')[-1]}={m[k]:.3f}" for k in keys if k in m), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["grpo", "efr", "uec"], default="uec")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--low", type=float, default=DEFAULTS["low"], help="band low, x the first step's entropy")
    ap.add_argument("--high", type=float, default=DEFAULTS["high"], help="band high, x the first step's entropy")
    ap.add_argument("--ema", type=float, default=DEFAULTS["ema"])
    ap.add_argument("--explore", type=int, default=DEFAULTS["explore"])
    ap.add_argument("--coef-step", type=float, default=DEFAULTS["coef_step"], help="uec entropy_coef_step (0 = knob off)")
    ap.add_argument("--coef-max", type=float, default=DEFAULTS["coef_max"])
    ap.add_argument("--keep-zero-adv", action="store_true", help="uec keep_zero_adv_below")
    ap.add_argument("--coef-gain", type=float, default=0.0, help="uec entropy_coef_gain (> 0: proportional law)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    ap.add_argument("--drop-truncated-positive", action="store_true",
                    help="eframe_filter's default drop_truncated_positive=true (the 12-token continuations are all "
                         "truncated, so it drops every positive row)")
    args = ap.parse_args()
    if not MODEL.exists():
        raise SystemExit(f"error: {MODEL} not found (needs ../shared)")
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {vars(args)}")
    t0 = time.time()
    rows = run(args.mode, args.steps, lr=args.lr, low=args.low, high=args.high, ema=args.ema, explore=args.explore,
               coef_step=args.coef_step, coef_max=args.coef_max, new_tokens=args.new_tokens, seed=args.seed,
               keep_zero_adv=args.keep_zero_adv, coef_gain=args.coef_gain,
               keep_truncated_positive=not args.drop_truncated_positive)
    trace = [r["eframe/rollout_entropy"] for r in rows]
    s = smoothed(trace, args.ema)
    print(f"{args.steps} steps in {time.time() - t0:.1f} s; band [{args.low}, {args.high}] x S_1 = "
          f"[{args.low * s[0]:.3f}, {args.high * s[0]:.3f}]; smoothed entropy: "
          + " ".join(f"{x:.2f}" for x in s))
    print(f"in band after warm-up ({args.warmup} steps): "
          f"{in_band_fraction(trace, args.low, args.high, args.ema, args.warmup):.2f}")


if __name__ == "__main__":
    main()
