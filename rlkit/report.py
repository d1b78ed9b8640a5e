"""Run reports: PNG plots, a terminal reward curve and one self-contained HTML page.

    python -m rlkit report runs/x                        # runs/x/report/*.png and runs/x/report/index.html
    python -m rlkit report runs/a runs/b --out cmp       # overlaid plots, side-by-side summary: cmp/index.html

Everything is read from the run directory: ``metrics.jsonl`` (one JSON object per step), ``completions.jsonl``,
``config.yaml`` and the ``eval/step_N/*.json`` files that ``python -m rlkit eval`` writes for a checkpoint
(``checkpoints/step_N/model/``).  The HTML page embeds its plots as base64 PNGs, so it opens from disk in any
browser with no server and no network.  Its sections: summary, plots, evaluation, completions (the best, the
worst and one random completion of a bounded number of steps, read in one streaming pass so a multi-GB
``completions.jsonl`` is fine), and the resolved config.  The page is a Jinja2 template with autoescaping, so every
value taken from the run is HTML-escaped.
"""
from __future__ import annotations

import base64
import fnmatch
import glob
import json
import os
import random
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

# (title, metric keys[, required key]); a key may be a glob pattern ("dump/weight/*": one line per data source);
# a panel with a required key is drawn only for runs that logged it
PANELS = [
    ("reward", ["reward/mean", "accuracy"]),
    ("reward per function", ["reward/*/mean"]),
    ("evaluation", ["eval/strict/pass@1", "eval/flexible/pass@1"]),
    ("entropy", ["entropy/mean"]),
    ("response length", ["response_length/mean"]),
    ("KL", ["kl/mean", "kl_reward/token_mean", "kl_reward/seq_mean"]),
    ("clip fraction", ["clipfrac/mean"]),
    ("log-prob gap (rollout vs trainer)", ["logprob_gap/mean", "logprob_gap/max"]),
    ("time per stage (s)", ["time/rollout", "time/reward", "time/score", "time/advantage", "time/train", "time/weight_sync",
                            "time/eval"]),
    ("curriculum: source weights", ["dump/weight/*"]),
    ("curriculum: length budget (tokens)", ["length_budget/budget", "response_length/mean"], "length_budget/budget"),
]
TEXT_LIMIT = 2000          # characters of a prompt / completion shown in the HTML page


# ------------------------------------------------------------------ reading
def read_metrics(run_dir: str) -> List[Dict[str, float]]:
    """Every step's metrics; a line still being written by a live run is skipped."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def run_labels(run_dirs: Sequence[str]) -> List[str]:
    """Short unique names: the directory name, or the whole path where two runs share it."""
    base = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [b if base.count(b) == 1 else os.path.normpath(d) for b, d in zip(base, run_dirs)]


def expand_keys(keys: Sequence[str], rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Panel keys with glob patterns expanded against the keys the run logged (sorted)."""
    from .metric_names import rlkit_name

    present = sorted({rlkit_name(k) for r in rows for k in r})  # TRL-named runs are matched by rlkit's names
    out: List[str] = []
    for k in keys:
        for m in ([k] if not any(c in k for c in "*?[") else [p for p in present if fnmatch.fnmatchcase(p, k)]):
            if m not in out:
                out.append(m)
    return out


def series(rows: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of one metric; a run logged with ``trainer.metric_names: trl`` is read by TRL's name."""
    from .metric_names import trl_name

    xs, ys = [], []
    for k in (key, trl_name(key)):
        for r in rows if k else ():
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(r["step"])
                ys.append(float(v))
        if xs:
            break
    return xs, ys


def smooth(ys: Sequence[float], weight: float) -> List[float]:
    """TensorBoard's exponential moving average, debiased: ``weight`` 0 = none, 0.9 = strong."""
    out, avg = [], 0.0
    for i, y in enumerate(ys):
        avg = weight * avg + (1 - weight) * y
        out.append(avg / (1 - weight ** (i + 1)) if weight > 0 else y)
    return out


def flat_config(run_dir: str) -> Dict[str, Any]:
    """``config.yaml`` as dotted keys (lists and plugin specs kept whole)."""
    import yaml

    p = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        tree = yaml.safe_load(f) or {}
    out: Dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and "name" not in node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node
    walk(tree, "")
    return out


def config_diff(run_dirs: Sequence[str]) -> List[Tuple[str, List[Any]]]:
    """(key, value per run) for every config key whose value differs between the runs."""
    cfgs = [flat_config(d) for d in run_dirs]
    keys = sorted({k for c in cfgs for k in c} - {"recipe"})
    missing = object()
    out = []
    for k in keys:
        vals = [c.get(k, missing) for c in cfgs]
        if any(v != vals[0] for v in vals[1:]):
            out.append((k, ["(absent)" if v is missing else json.dumps(v) if isinstance(v, (dict, list)) else v for v in vals]))
    return out


def checkpoint_evals(run_dir: str) -> List[Tuple[int, str, Dict[str, float]]]:
    """(step, tag, results) for every ``eval/step_N/<tag>.json`` that ``python -m rlkit eval`` writes for a checkpoint
    of the run (and ``checkpoints/step_N/model/eval_<tag>.json`` of older versions), by step."""
    from .evaluation import read_results

    out = []
    files = [(p, os.path.basename(p)[:-len(".json")]) for p in glob.glob(os.path.join(run_dir, "eval", "step_*", "*.json"))]
    files += [(p, os.path.basename(p)[len("eval_"):-len(".json")])
              for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "model", "eval_*.json"))]
    for p, tag in files:
        m = re.search(r"step_(\d+)", os.path.relpath(p, run_dir))
        try:
            res = read_results(p)
        except (OSError, json.JSONDecodeError):
            continue
        out.append((int(m.group(1)) if m else -1, tag, res))
    return sorted(out, key=lambda x: (x[0], x[1]))


def pick_steps(steps: Sequence[int], k: int) -> List[int]:
    """At most ``k`` steps, evenly spread, always the first and the last."""
    steps = sorted(set(steps))
    if k <= 0 or not steps:
        return []
    if len(steps) <= k:
        return steps
    if k == 1:
        return [steps[-1]]
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


_STEP = re.compile(r'^\{"step": (\d+)')


def sample_completions(path: str, steps: Sequence[int], seed: int = 0) -> Dict[int, Dict[str, Dict[str, Any]]]:
    """{step: {"best": row, "worst": row, "random": row}} for the given steps, in one streaming pass.
    Best / worst by reward (rows without a reward are only candidates for "random"); random by reservoir
    sampling with a per-step seed, so the page is reproducible."""
    want = set(steps)
    picked: Dict[int, Dict[str, Any]] = {}
    seen: Dict[int, int] = {}
    if not want or not os.path.exists(path):
        return {}
    with open(path) as f:
        for line in f:
            m = _STEP.match(line)  # the tracker writes "step" first: skip other steps without parsing them
            if m is not None and int(m.group(1)) not in want:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            s = row.get("step")
            if s not in want:
                continue
            p = picked.setdefault(s, {})
            seen[s] = seen.get(s, 0) + 1
            if random.Random(seed * 1000003 + s * 7919 + seen[s]).random() < 1.0 / seen[s]:
                p["random"] = row
            r = row.get("reward")
            if isinstance(r, (int, float)):
                if "best" not in p or r > p["best"]["reward"]:
                    p["best"] = row
                if "worst" not in p or r < p["worst"]["reward"]:
                    p["worst"] = row
    return picked


def summarize_run(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """A few numbers per run for the summary table."""
    def window(key, first):
        _, ys = series(rows, key)
        if not ys:
            return None
        w = max(1, len(ys) // 10)
        part = ys[:w] if first else ys[-w:]
        return sum(part) / len(part)

    out: Dict[str, Any] = {"steps": rows[-1]["step"] if rows else 0}
    out["reward/mean (first 10%)"] = window("reward/mean", True)
    out["reward/mean (last 10%)"] = window("reward/mean", False)
    out["accuracy (last 10%)"] = window("accuracy", False)
    out["response_length/mean (last 10%)"] = window("response_length/mean", False)
    xs, ys = series(rows, "eval/strict/pass@1")
    if ys:
        best = max(range(len(ys)), key=lambda i: ys[i])
        out["eval strict pass@1 (last)"] = ys[-1]
        out["eval strict pass@1 (best, step)"] = f"{_fmt(ys[best])} @ {xs[best]}"
    wall = sum(series(rows, "time/step")[1]) + sum(series(rows, "time/eval")[1])
    out["wall time (s)"] = wall if wall > 0 else None
    _, tps = series(rows, "throughput/tokens_per_s")
    out["tokens/s (mean)"] = sum(tps) / len(tps) if tps else None
    return out


# ------------------------------------------------------------------ plots
STYLES = [("-", None), ("--", None), (":", None), ("-.", None), ("-", "o"), ("--", "s"), (":", "^"), ("-.", "x")]


def plot_panels(runs: Dict[str, List[Dict[str, Any]]], out_dir: str, smoothing: float = 0.0) -> List[Tuple[str, str]]:
    """One PNG per panel that has data, every run overlaid; returns (title, path) pairs.  Each run keeps one
    colour on every panel and the metrics of a panel differ by line style; a single run colours its metrics
    instead.  ``smoothing`` > 0 draws the exponential moving average over the faint raw curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(out_dir, exist_ok=True)
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    run_colour = {name: palette[i % len(palette)] for i, name in enumerate(runs)}
    written = []
    for title, keys, *required in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for name, rows in runs.items():
            if required and not series(rows, required[0])[0]:
                continue
            for j, k in enumerate(expand_keys(keys, rows)):
                xs, ys = series(rows, k)
                if not xs:
                    continue
                if len(runs) > 1:
                    colour, (ls, mk) = run_colour[name], STYLES[j % len(STYLES)]
                else:
                    colour, (ls, mk) = palette[j % len(palette)], STYLES[(j // len(palette)) % len(STYLES)]
                label = f"{name}: {k}" if len(runs) > 1 else k
                mk = mk or ("o" if len(xs) < 3 else None)
                if smoothing > 0:
                    ax.plot(xs, ys, color=colour, linestyle=ls, alpha=0.25)
                    ys = smooth(ys, smoothing)
                ax.plot(xs, ys, color=colour, linestyle=ls, marker=mk, markersize=3, label=label)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title + (f" (smoothed {smoothing})" if smoothing > 0 else ""))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(out_dir, re.sub(r"\W+", "_", title.split(" (")[0]).strip("_") + ".png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append((title, p))
    return written


def plot_runs(run_dirs: Sequence[str], out_dir: str) -> List[str]:
    """One PNG per panel, every run overlaid; returns the paths written."""
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs)))
    return [p for _, p in plot_panels(runs, out_dir)]


def ascii_curve(values: Sequence[float], width: int = 60, height: int = 10, label: str = "reward") -> str:
    """A small text plot (steps on x, value on y) for terminals and CI logs."""
    vals = [v for v in values if v is not None]
    if not vals:
        return f"{label}: no data"
    n = len(values)
    cols = min(width, n)
    buckets = []
    for c in range(cols):
        seg = [v for v in values[c * n // cols:(c + 1) * n // cols] if v is not None]
        buckets.append(sum(seg) / len(seg) if seg else None)
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    grid = [[" "] * cols for _ in range(height)]
    for c, v in enumerate(buckets):
        if v is not None:
            r = int(round((v - lo) / span * (height - 1)))
            grid[height - 1 - r][c] = "*"
    lines = [f"{hi:8.3f} |" + "".join(grid[0])] + ["         |" + "".join(row) for row in grid[1:-1]]
    lines.append(f"{lo:8.3f} |" + "".join(grid[-1]))
    lines.append("         +" + "-" * cols)
    lines.append(f"          {label} over {n} steps (step 1 .. {n})")
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML
# The page is one Jinja2 template with autoescaping on: every value taken from a run (completions, prompts, config,
# metric names, paths) is escaped by the template engine, not by hand.  Only the base64 plots are marked safe.
TEMPLATE = """<!DOCTYPE html>
{%- macro table(t) -%}
<table class='{{ t.cls }}'><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for r in t.rows %}<tr>{% for c in r %}<td>{{ c | fmt }}</td>{% endfor %}</tr>{% endfor %}</table>
{%- endmacro -%}
{%- macro wrap(name, single) -%}{% if single %}{{ caller() }}{% else %}<details open><summary>{{ name }}</summary>{{ caller() }}</details>{% endif %}{%- endmacro -%}
<html><head><meta charset='utf-8'><title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<p>Generated {{ generated }} from {{ sources | join(", ") }}</p>
<nav><a href='#summary'>Summary</a><a href='#plots'>Plots</a><a href='#eval'>Evaluation</a><a href='#completions'>Completions</a><a href='#config'>Config</a></nav>
<h2 id='summary'>Summary</h2>{{ table(summary) }}
{%- if diff is not none %}<h3>Config differences</h3>{% if diff.rows %}{{ table(diff) }}{% else %}<p>The runs' configs are identical.</p>{% endif %}{% endif %}
<h2 id='plots'>Plots</h2><div class='plots'>
{%- for p in plots %}<img alt='{{ p.title }}' title='{{ p.title }}' src='data:image/png;base64,{{ p.data }}'>{% else %}<p>No metrics to plot.</p>{% endfor %}</div>
<h2 id='eval'>Evaluation</h2>
{%- for r in runs %}{% call wrap(r.name, single) %}
{%- for t in r.evals %}<h3>{{ t.title }}</h3>{{ table(t) }}{% else %}<p>No evaluation results (no eval/* metrics, no checkpoints/step_N/model/eval_*.json).</p>{% endfor %}
{%- endcall %}{% endfor %}
<h2 id='completions'>Completions (best, worst, one random per step; {{ completion_steps }} steps at most)</h2>
{%- for r in runs %}{% call wrap(r.name, single) %}
{%- for s in r.completions %}<h3>step {{ s.step }}</h3><table class='comp'><tr><th>pick</th><th>reward</th><th>advantage</th><th>length</th><th>finish</th><th>answer</th><th>prompt</th><th>completion</th></tr>
{%- for row in s.rows %}<tr>{% for c in row.cells %}<td>{{ c | fmt }}</td>{% endfor %}<td><pre>{{ row.texts[0] }}</pre></td>
{%- if row.spans %}<td><pre>{% for sp in row.spans %}<span class='{{ "pol" if sp.policy else "obs" }}' title='{{ sp.role }}{{ "" if sp.policy else " (observation: masked out of the loss)" }}'>{{ sp.text }}</span>{% endfor %}</pre></td>
{%- else %}<td><pre>{{ row.texts[1] }}</pre></td>{% endif %}</tr>{% endfor %}</table>
{%- else %}<p>No completions (completions.jsonl missing or empty for these steps).</p>{% endfor %}
{%- endcall %}{% endfor %}
<h2 id='config'>Config</h2>
{%- for r in runs %}{% call wrap(r.name, single) %}{% if r.config is not none %}<pre class='config'>{{ r.config }}</pre>{% else %}<p>No config.yaml in the run directory.</p>{% endif %}{% endcall %}{% endfor %}
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]], cls: str = "", title: str = "") -> Dict[str, Any]:
    return {"header": list(header), "rows": [list(r) for r in rows], "cls": cls, "title": title}


def _clip(text: Any) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= TEXT_LIMIT else s[:TEXT_LIMIT] + f"\n[... {len(s) - TEXT_LIMIT} more characters]"


def eval_tables(rows: Sequence[Dict[str, Any]], run_dir: str, max_cols: int = 12) -> List[Dict[str, Any]]:
    """eval/* metrics logged during training (metric x step) and eval_*.json files next to checkpoints."""
    tables = []
    steps = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if steps:
        shown = {s: None for s in pick_steps([r["step"] for r in steps], max_cols)}
        steps = [r for r in steps if r["step"] in shown]
        keys = sorted({k for r in steps for k in r if k.startswith("eval/")}, key=_eval_order)
        tables.append(_table(["metric"] + [f"step {r['step']}" for r in steps],
                             [[k[len("eval/"):]] + [r.get(k) for r in steps] for k in keys], "num",
                             f"During training ({len(shown)} evaluations shown)"))
    files = checkpoint_evals(run_dir)
    if files:
        keys = sorted({k for _, _, res in files for k in res}, key=_eval_order)
        tables.append(_table(["metric"] + [f"step {s}: {tag}" for s, tag, _ in files],
                             [[k] + [res.get(k) for _, _, res in files] for k in keys], "num",
                             "Checkpoint evaluations (eval_*.json)"))
    return tables


def _eval_order(key: str):
    k = key[len("eval/"):] if key.startswith("eval/") else key
    rank = 0 if k in ("num_prompts", "samples_per_prompt") else 1 if k.startswith("strict/") else \
        2 if k.startswith("flexible/") else 4 if k.startswith("by_") else 3
    return rank, k


def completion_rows(run_dir: str, steps: Sequence[int], seed: int = 0) -> List[Dict[str, Any]]:
    """Per step: the best, the worst and one random completion (one "best = worst" row when every reward is equal)."""
    picked = sample_completions(os.path.join(run_dir, "completions.jsonl"), steps, seed)
    out = []
    for s in sorted(picked):
        p = picked[s]
        same = "best" in p and "worst" in p and p["best"]["reward"] == p["worst"]["reward"]
        rows = []
        for kind in ("best", "worst", "random"):
            r = p.get(kind)
            if r is None or (same and kind == "worst"):
                continue
            label = f"best = worst (every reward {_fmt(r.get('reward'))})" if same and kind == "best" else kind
            rows.append({"cells": [label, r.get("reward"), r.get("advantage"), r.get("length"), r.get("finish_reason"),
                                   r.get("answer")],
                         "texts": [_clip(r.get("prompt")), _clip(r.get("completion"))],
                         # multi-turn: the conversation's spans, observations (masked tokens) shaded
                         "spans": [{"role": str(sp.get("role", "")), "policy": bool(sp.get("policy")), "text": _clip(sp.get("text"))}
                                   for sp in (r.get("spans") or []) if isinstance(sp, dict)]})
        out.append({"step": s, "rows": rows})
    return out


def config_text(run_dir: str) -> Optional[str]:
    p = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return f.read()


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}
th{background:#f3f3f3}table.num td{text-align:right}table.num td:first-child{text-align:left}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-width:600px}
span.obs{background:#e8eefc;color:#345}
pre.config{max-width:none;background:#f8f8f8;padding:.5em}.plots img{width:540px;margin:4px}
nav a{margin-right:1em}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}"""


def render_page(**context: Any) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    return env.from_string(TEMPLATE).render(css=CSS, **context)


def write_report(run_dirs: Sequence[str], out_dir: str, completion_steps: int = 8, seed: int = 0,
                 smoothing: float = 0.0) -> Dict[str, Any]:
    """Write the PNGs and ``out_dir/index.html`` for one run or a comparison of several.
    Returns ``{"html": path, "plots": [png paths]}``."""
    labels = run_labels(run_dirs)
    runs = dict(zip(labels, (read_metrics(d) for d in run_dirs)))
    plots = plot_panels(runs, out_dir, smoothing)
    single = len(run_dirs) == 1
    summaries = {name: summarize_run(rows) for name, rows in runs.items()}
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))
    if single:
        summary = _table(["", labels[0]], [[k, summaries[labels[0]].get(k)] for k in keys], "num")
    else:
        summary = _table(["run"] + keys, [[name] + [s.get(k) for k in keys] for name, s in summaries.items()], "num")
    n_steps = completion_steps if single else max(1, min(completion_steps, 3))
    encoded = []
    for t, p in plots:
        with open(p, "rb") as f:
            encoded.append({"title": t, "data": base64.b64encode(f.read()).decode("ascii")})
    page = render_page(
        title=f"rlkit report: {labels[0]}" if single else "rlkit comparison: " + " vs ".join(labels),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"), sources=[os.path.abspath(d) for d in run_dirs],
        single=single, summary=summary, plots=encoded, completion_steps=n_steps,
        diff=None if single else _table(["key"] + labels, [[k] + v for k, v in config_diff(run_dirs)]),
        runs=[{"name": name, "evals": eval_tables(runs[name], d),
               "completions": completion_rows(d, pick_steps([r["step"] for r in runs[name]], n_steps), seed),
               "config": config_text(d)} for name, d in zip(labels, run_dirs)])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return {"html": path, "plots": [p for _, p in plots]}


# ------------------------------------------------------------------ CLI
def main(argv=None) -> Optional[str]:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m rlkit report",
                                 description="Plots, a terminal reward curve and an HTML page for one run or several.")
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", default=None, help="output directory (default: RUN/report for one run, ./report for several)")
    ap.add_argument("--completion-steps", type=int, default=8, help="steps with sampled completions in the page")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random completion picks")
    ap.add_argument("--smooth", type=float, default=0.0, help="exponential moving average weight for the curves, in [0, 1)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    for d in args.runs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            raise SystemExit(f"{d}: no metrics.jsonl (is it a run directory?)")
    out = args.out or (os.path.join(args.runs[0], "report") if len(args.runs) == 1 else "report")
    if not 0.0 <= args.smooth < 1.0:
        raise SystemExit(f"--smooth must be in [0, 1), got {args.smooth}")
    written = write_report(args.runs, out, args.completion_steps, args.seed, args.smooth)
    for p in written["plots"]:
        print(f"wrote {p}")
    for name, d in zip(run_labels(args.runs), args.runs):
        print(ascii_curve([r.get("reward/mean") for r in read_metrics(d)], label=f"{name} reward/mean"))
    print(f"wrote {written['html']}")
    return written["html"]
