"""Evaluation: pass@1, unbiased pass@k, maj@k, with strict and flexible
extraction side by side, the format rate and the mean response length.

* gsm8k: strict = last ``#### N``; flexible = last number in the text.
* math: strict = last ``\\boxed{}`` checked with math-verify; flexible =
  math-verify's own extraction over the whole completion.

Deterministic at temperature 0; seeded otherwise.  Used inside training
(``eval.every_steps``) and from the command line::

    python -m rlkit eval model=runs/x/checkpoints/step_50/model recipe=recipes/grpo_gsm8k.yaml \\
        data.eval_path=../shared/data/gsm8k/test.jsonl eval.samples_per_prompt=4 eval.temperature=0.6

The command line writes ``runs/x/eval/step_50/gsm8k_test__gsm8k_n4_t0.6_p64_len<N>_seed42_<hash>.json``: one file
per dataset and settings (:func:`results_name`), in the run (or ``output_dir=DIR``), never in the model folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

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
                  seed: int = 0, raw: bool = False, progress=None, prompts_per_call: Optional[int] = None):
    """Generate ``eval_cfg.samples_per_prompt`` completions per row and check them.  With ``progress`` (a
    :class:`rlkit.tracking.Progress`) the prompts go to the engine ``prompts_per_call`` at a time and each call
    advances it; the call starting at prompt ``s`` gets seed ``seed + s``, which is how the HF engine seeds its own
    chunks, so the samples are those of one call."""
    n = eval_cfg.samples_per_prompt
    sp = SamplingParams(temperature=eval_cfg.temperature, top_p=1.0, max_new_tokens=max_new_tokens, stop=list(stop or []),
                        seed=seed)
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # evaluation must not perturb training's RNG stream
    try:
        if progress is None:
            comps = engine.generate([r["prompt_ids"] for r in rows], n, sp) if rows else []
        else:
            import dataclasses

            comps = []
            step = max(1, prompts_per_call or len(rows) or 1)
            for start in range(0, len(rows), step):
                part = rows[start:start + step]
                comps += engine.generate([r["prompt_ids"] for r in part], n, dataclasses.replace(sp, seed=seed + start))
                progress.update(len(part))
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


_CHECKPOINT_DIR = re.compile(r"^(?P<run>.+)/checkpoints/step_(?P<step>\d+)/model/?$")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-.") or "x"


def dataset_tag(data_cfg) -> str:
    """``math500_test`` for ``.../math500/test.jsonl`` (parent folder + file name: the many ``test.jsonl`` files
    stay apart); ``HuggingFaceH4_MATH-500_test`` for a hub dataset (name, config, split)."""
    path = str(data_cfg.eval_path or data_cfg.path)
    if os.path.exists(path):
        p = os.path.abspath(path)
        stem = os.path.splitext(os.path.basename(p))[0]
        parent = os.path.basename(os.path.dirname(p))
        return _slug(f"{parent}_{stem}" if parent else stem)
    name = data_cfg.eval_name if data_cfg.eval_path else data_cfg.name
    return _slug("_".join(x for x in (path.replace("/", "_"), name, data_cfg.eval_split) if x))


def eval_settings(cfg) -> Dict[str, Any]:
    """Everything that changes an evaluation's numbers besides the model (recorded in the results file)."""
    from .config import to_dict

    d = cfg.data
    return {
        "eval": to_dict(cfg.eval), "max_new_tokens": cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        "seed": cfg.trainer.seed, "stop": list(cfg.rollout.stop), "engine": cfg.rollout.engine,
        "data": {k: getattr(d, k) for k in ("path", "name", "eval_path", "eval_name", "eval_split", "eval_max_rows",
                                            "prompt_field", "answer_field", "answer_extraction", "template",
                                            "system_prompt", "chat_template", "max_prompt_tokens")},
    }


def results_name(cfg) -> str:
    """``<dataset>__<checker>_n<samples>_t<temperature>_<p<max prompts>|all>_len<max new tokens>[_seed<s>]_<hash>``;
    the hash covers every setting of :func:`eval_settings` (template, stop strings, ...), so two evaluations with
    different settings never share a file, and rerunning the same one replaces its own file only."""
    e = cfg.eval
    s = eval_settings(cfg)
    tag = (f"{e.checker}_n{e.samples_per_prompt}_t{e.temperature:g}_{f'p{e.max_prompts}' if e.max_prompts else 'all'}"
           f"_len{s['max_new_tokens']}" + (f"_seed{cfg.trainer.seed}" if e.temperature > 0 else ""))
    digest = hashlib.sha1(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{dataset_tag(cfg.data)}__{tag}_{digest}"


def results_dir(model: str, output_dir: Optional[str], trainer_output_dir: str = "runs") -> Tuple[str, Optional[int]]:
    """Where results go, never the model folder: ``output_dir`` when given; ``RUN/eval/step_N`` for a checkpoint
    ``RUN/checkpoints/step_N/model``; else ``<trainer.output_dir>/eval/<model name>``.  Also the step (or None)."""
    m = _CHECKPOINT_DIR.match(os.path.abspath(model).replace(os.sep, "/")) if os.path.isdir(model) else None
    step = int(m.group("step")) if m else None
    if output_dir:
        return output_dir, step
    if m:
        return os.path.join(m.group("run"), "eval", f"step_{step}"), step
    return os.path.join(trainer_output_dir, "eval", _slug(model.rstrip("/\\").replace("/", "--").replace(":", "-"))), None


def write_results(results: Dict[str, float], out_dir: str, name: str, meta: Optional[Dict[str, Any]] = None) -> str:
    """``out_dir/name.json`` = ``{"results": {...}, **meta}``, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results, **(meta or {})}, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


def read_results(path: str) -> Dict[str, float]:
    """The metrics of a results file (also the flat files of older versions)."""
    with open(path) as f:
        data = json.load(f)
    return data["results"] if isinstance(data, dict) and isinstance(data.get("results"), dict) else data


def _looks_like_path(model: str) -> bool:
    return (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or model.endswith(("/", os.sep))
            or os.sep != "/" and os.sep in model)


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """``python -m rlkit eval model=DIR [recipe=...] [output_dir=DIR] [data.eval_path=...] [eval.*=...]``; a user
    error (missing model or data, a typo) is one line and a non-zero exit (rlkit/errors.py)."""
    from .errors import run_cli

    return run_cli(_main, argv)


def _main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    import sys

    from .clihelp import EVAL_USAGE
    from .config import ConfigError, load_config
    from .data import load_prompts
    from .modeling import load_causal_lm, load_tokenizer
    from .registry import ROLLOUT_ENGINES, suggest
    from .tracking import Progress

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(EVAL_USAGE)
        return {}
    model_dir = output_dir = None
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0].lstrip("-").replace("-", "_")
        if key == "model" and "=" in a:
            model_dir = a.split("=", 1)[1]
        elif key == "output_dir" and "=" in a:
            output_dir = a.split("=", 1)[1]
        elif key == "output_dir":
            if i + 1 >= len(argv):
                raise ConfigError("--output_dir needs a directory (--output_dir DIR or output_dir=DIR)")
            output_dir = argv[i + 1]
            i += 1
        else:
            rest.append(a)
        i += 1
    if not model_dir:
        keys = [a.split("=", 1)[0].lstrip("-") for a in rest if "=" in a]
        typo = next((k for k in keys if "." not in k and suggest(k, ["model"])), None)
        hint = f" Got {typo}=...: did you mean model=?" if typo else ""
        raise ConfigError("model=DIR is required (a checkpoint's HF directory or a hub id)." + hint
                          + " Usage: python -m rlkit eval --help")
    cfg = load_config(rest + [f"model.name_or_path={model_dir}"])  # typos and bad values: one line, before loading
    from .tracking import quiet_library_bars, use_progress_bar

    if not use_progress_bar(cfg.trainer.progress_bar):
        quiet_library_bars()
    if not model_dir.startswith("toy:") and not os.path.isdir(model_dir) and _looks_like_path(model_dir):
        raise ConfigError(f"model={model_dir!r}: no such model directory")
    try:
        tok = load_tokenizer(cfg.model.tokenizer or model_dir, cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # not a model directory, an unknown or malformed hub id, no network
        raise ConfigError(f"model={model_dir!r}: cannot load the tokenizer: {' '.join(str(e).split())[:300]}") from None
    rows = load_prompts(cfg.data, tok, "eval")  # DataError: a missing file, a missing column (one line)
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    try:
        lm = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model={model_dir!r}: cannot load the model: {' '.join(str(e).split())[:300]}") from None
    engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(model=lm, tokenizer=tok, config=cfg,
                                                     samples_per_generate_call=cfg.rollout.samples_per_generate_call,
                                                     **cfg.rollout.engine_args)
    out_dir, step = results_dir(model_dir, output_dir, cfg.trainer.output_dir)
    name = results_name(cfg)
    progress = Progress(len(rows), f"eval {dataset_tag(cfg.data)}", cfg.trainer.progress_bar, unit="prompts")
    try:
        res = evaluate_rows(engine, rows, cfg.eval, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                            cfg.rollout.stop, cfg.trainer.seed, progress=progress,
                            prompts_per_call=max(1, cfg.rollout.samples_per_generate_call // max(1, cfg.eval.samples_per_prompt)))
    finally:
        progress.close()
    path = write_results(res, out_dir, name, {"model": model_dir, "step": step, "dataset": dataset_tag(cfg.data),
                                              "settings": eval_settings(cfg), "recipe": cfg.recipe})
    for k, v in res.items():
        print(f"{k:40s} {v:.4f}")
    print(f"wrote {path}")
    return res
