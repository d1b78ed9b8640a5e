"""Evaluation: pass@1, unbiased pass@k, maj@k, with strict and flexible
extraction side by side, the format rate and the mean response length.

* gsm8k: strict = last ``#### N``; flexible = last number in the text.
* math: strict = last ``\\boxed{}`` checked with math-verify; flexible =
  math-verify's own extraction over the whole completion.

Deterministic at temperature 0; seeded otherwise.  Used inside training
(``eval.every_steps``) and from the command line::

    python -m rlkit eval model=runs/x/checkpoints/step_50/model recipe=recipes/grpo_gsm8k.yaml \\
        data.eval_path=../shared/data/gsm8k/test.jsonl eval.samples_per_prompt=4 eval.temperature=0.6
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any, Dict, List, Optional

from .rollout.base import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, Codex paper, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _check(checker: str, completions: List[str], gold: Optional[str]):
    """Per completion: (strict_ok, flexible_ok, formatted, strict_answer, flexible_answer)."""
    from .answers import extract_gsm8k_flexible, extract_gsm8k_strict, extract_last_boxed, numbers_equal

    out = []
    if checker == "gsm8k":
        for c in completions:
            s, f = extract_gsm8k_strict(c), extract_gsm8k_flexible(c)
            ok_s = gold is not None and s is not None and numbers_equal(s, gold)
            ok_f = gold is not None and f is not None and numbers_equal(f, gold)
            out.append((ok_s, ok_f, s is not None, s, f))
        return out
    from .mathverify import math_equal_many

    boxed = [extract_last_boxed(c) for c in completions]
    n = len(completions)
    if gold is None:
        res_boxed, res_flex = [False] * n, [False] * n
    else:  # bare box contents are parsed as boxed LaTeX (plain parsing reads "3\pi" as 3)
        res_boxed = math_equal_many([(gold, b if b is not None else "") for b in boxed], timeout_s=10.0, boxed_pred=True)
        res_flex = math_equal_many([(gold, c) for c in completions], timeout_s=10.0)
    for i in range(n):
        out.append((bool(res_boxed[i]) and boxed[i] is not None, bool(res_flex[i]), boxed[i] is not None, boxed[i], boxed[i]))
    return out


def evaluate_rows(engine, rows: List[Dict[str, Any]], eval_cfg, max_new_tokens: int, stop: Optional[List[str]] = None,
                  seed: int = 0, raw: bool = False):
    """Generate ``eval_cfg.samples_per_prompt`` completions per row and check them."""
    n = eval_cfg.samples_per_prompt
    sp = SamplingParams(temperature=eval_cfg.temperature, top_p=1.0, max_new_tokens=max_new_tokens, stop=list(stop or []),
                        seed=seed)
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # evaluation must not perturb training's RNG stream
    try:
        comps = engine.generate([r["prompt_ids"] for r in rows], n, sp) if rows else []
    finally:
        torch.random.set_rng_state(state)
    records = []
    for r, cs in zip(rows, comps):
        texts = [c.text for c in cs]
        checks = _check(eval_cfg.checker, texts, r.get("answer"))
        records.append({
            "answer": r.get("answer"),
            "strict": [c[0] for c in checks], "flexible": [c[1] for c in checks], "formatted": [c[2] for c in checks],
            "strict_answers": [c[3] for c in checks], "flexible_answers": [c[4] for c in checks],
            "lengths": [len(c.token_ids) for c in cs],
            **{k: r[k] for k in ("subject", "level", "type") if k in r},
        })
    return records if raw else summarize(records)


def _maj_correct(answers: List[Optional[str]], correct: List[bool]) -> bool:
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return any(ok for a, ok in zip(answers, correct) if a == top)


def summarize(records: List[Dict[str, Any]]) -> Dict[str, float]:
    if not records:
        return {}
    n = min(len(r["strict"]) for r in records)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    out: Dict[str, float] = {"num_prompts": float(len(records)), "samples_per_prompt": float(n)}
    for mode in ("strict", "flexible"):
        for k in ks:
            out[f"{mode}/pass@{k}"] = sum(pass_at_k(n, sum(r[mode][:n]), k) for r in records) / len(records)
        for k in ks[1:]:
            out[f"{mode}/maj@{k}"] = sum(_maj_correct(r[f"{mode}_answers"][:k], r[mode][:k]) for r in records) / len(records)
    out["format_rate"] = sum(sum(r["formatted"][:n]) for r in records) / (len(records) * n)
    out["response_length/mean"] = sum(sum(r["lengths"][:n]) for r in records) / (len(records) * n)
    for key in ("subject", "level"):
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for r in records:
            if key in r:
                groups.setdefault(str(r[key]), []).append(r)
        for g, rs in sorted(groups.items()):
            out[f"by_{key}/{g}/strict/pass@1"] = sum(sum(r["strict"][:n]) / n for r in rs) / len(rs)
    return out


def write_results(results: Dict[str, float], model_dir: str, tag: str) -> str:
    path = os.path.join(model_dir, f"eval_{tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return path


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """``python -m rlkit eval model=DIR [recipe=...] [data.eval_path=...] [eval.*=...]``"""
    import sys

    from .config import load_config
    from .data import load_prompts
    from .modeling import load_causal_lm, load_tokenizer
    from .registry import ROLLOUT_ENGINES

    argv = list(sys.argv[1:] if argv is None else argv)
    model_dir = None
    rest = []
    for a in argv:
        if a.startswith("model="):
            model_dir = a.split("=", 1)[1]
        else:
            rest.append(a)
    if model_dir is None:
        raise SystemExit("usage: python -m rlkit eval model=DIR [recipe=...] [data.eval_path=...] [eval.samples_per_prompt=...]")
    cfg = load_config(rest + [f"model.name_or_path={model_dir}"])
    tok = load_tokenizer(cfg.model.tokenizer or model_dir, cfg.model.trust_remote_code)
    rows = load_prompts(cfg.data, tok, "eval")
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    lm = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(model=lm, tokenizer=tok, config=cfg,
                                                     samples_per_generate_call=cfg.rollout.samples_per_generate_call,
                                                     **cfg.rollout.engine_args)
    res = evaluate_rows(engine, rows, cfg.eval, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, cfg.rollout.stop,
                        cfg.trainer.seed)
    tag = os.path.splitext(os.path.basename(str(cfg.data.eval_path or cfg.data.path)))[0] or "eval"
    path = write_results(res, model_dir, tag) if os.path.isdir(model_dir) else None
    for k, v in res.items():
        print(f"{k:40s} {v:.4f}")
    if path:
        print(f"wrote {path}")
    return res
