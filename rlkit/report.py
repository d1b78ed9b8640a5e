"""Run reports: PNG plots, a terminal reward curve and one self-contained HTML page.

    python -m rlkit report runs/x                        # runs/x/report/*.png and runs/x/report/index.html
    python -m rlkit report runs/a runs/b --out cmp       # overlaid plots, side-by-side summary: cmp/index.html

Everything is read from the run directory: ``metrics.jsonl`` (one JSON object per step), ``completions.jsonl``,
``config.yaml`` and the ``eval_*.json`` files that ``python -m rlkit eval`` writes next to a checkpoint
(``checkpoints/step_N/model/``).  The HTML page embeds its plots as base64 PNGs, so it opens from disk in any
browser with no server and no network.  Its sections: summary, plots, evaluation, completions (the best, the
worst and one random completion of a bounded number of steps, read in one streaming pass so a multi-GB
``completions.jsonl`` is fine), and the resolved config.  Every value taken from the run is HTML-escaped.
"""
from __future__ import annotations

import base64
import fnmatch
import glob
import html
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
    ("evaluation", ["eval/strict/pass@1", "eval/flexible/pass@1"]),
    ("entropy", ["entropy/mean"]),
    ("response length", ["response_length/mean"]),
    ("KL", ["kl/mean", "kl_reward/mean"]),
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
    present = sorted({k for r in rows for k in r})
    out: List[str] = []
    for k in keys:
        for m in ([k] if not any(c in k for c in "*?[") else [p for p in present if fnmatch.fnmatchcase(p, k)]):
            if m not in out:
                out.append(m)
    return out


def series(rows: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def checkpoint_evals(run_dir: str) -> List[Tuple[int, str, Dict[str, float]]]:
    """(step, tag, results) for every ``checkpoints/step_N/model/eval_<tag>.json``, by step."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "model", "eval_*.json")):
        m = re.search(r"step_(\d+)", p)
        try:
            with open(p) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        out.append((int(m.group(1)) if m else -1, os.path.basename(p)[len("eval_"):-len(".json")], res))
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
def plot_panels(runs: Dict[str, List[Dict[str, Any]]], out_dir: str) -> List[Tuple[str, str]]:
    """One PNG per panel that has data, every run overlaid; returns (title, path) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for title, keys, *required in PANELS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for name, rows in runs.items():
            if required and not series(rows, required[0])[0]:
                continue
            for k in expand_keys(keys, rows):
                xs, ys = series(rows, k)
                if xs:
                    ax.plot(xs, ys, label=f"{name}: {k}" if len(runs) > 1 else k, marker="o" if len(xs) < 3 else None)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
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
def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: Sequence[Any], body: Sequence[Sequence[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{esc(x)}</th>" for x in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in body)
    return f'<table class="{esc(cls)}"><tr>{h}</tr>{rows}</table>'


def _clip(text: Any) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= TEXT_LIMIT else s[:TEXT_LIMIT] + f"\n[... {len(s) - TEXT_LIMIT} more characters]"


def eval_section(rows: Sequence[Dict[str, Any]], run_dir: str, max_cols: int = 12) -> str:
    """eval/* metrics logged during training (metric x step) and eval_*.json files next to checkpoints."""
    parts = []
    steps = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if steps:
        shown = {s: None for s in pick_steps([r["step"] for r in steps], max_cols)}
        steps = [r for r in steps if r["step"] in shown]
        keys = sorted({k for r in steps for k in r if k.startswith("eval/")}, key=_eval_order)
        parts.append(f"<h3>During training ({len(shown)} evaluations shown)</h3>")
        parts.append(_table(["metric"] + [f"step {r['step']}" for r in steps],
                            [[k[len("eval/"):]] + [r.get(k) for r in steps] for k in keys], "num"))
    files = checkpoint_evals(run_dir)
    if files:
        keys = sorted({k for _, _, res in files for k in res}, key=_eval_order)
        parts.append("<h3>Checkpoint evaluations (eval_*.json)</h3>")
        parts.append(_table(["metric"] + [f"step {s}: {tag}" for s, tag, _ in files],
                            [[k] + [res.get(k) for _, _, res in files] for k in keys], "num"))
    return "".join(parts) or "<p>No evaluation results (no eval/* metrics, no checkpoints/step_N/model/eval_*.json).</p>"


def _eval_order(key: str):
    k = key[len("eval/"):] if key.startswith("eval/") else key
    rank = 0 if k in ("num_prompts", "samples_per_prompt") else 1 if k.startswith("strict/") else \
        2 if k.startswith("flexible/") else 4 if k.startswith("by_") else 3
    return rank, k


def completions_section(run_dir: str, steps: Sequence[int], seed: int = 0) -> str:
    picked = sample_completions(os.path.join(run_dir, "completions.jsonl"), steps, seed)
    if not picked:
        return "<p>No completions (completions.jsonl missing or empty for these steps).</p>"
    out = []
    for s in sorted(picked):
        out.append(f"<h3>step {esc(s)}</h3><table class='comp'><tr><th>pick</th><th>reward</th><th>advantage</th>"
                   f"<th>length</th><th>finish</th><th>answer</th><th>prompt</th><th>completion</th></tr>")
        for kind in ("best", "worst", "random"):
            r = picked[s].get(kind)
            if r is None:
                continue
            cells = [kind, r.get("reward"), r.get("advantage"), r.get("length"), r.get("finish_reason"), r.get("answer")]
            texts = [_clip(r.get("prompt")), _clip(r.get("completion"))]
            out.append("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in cells)
                       + "".join(f"<td><pre>{esc(t)}</pre></td>" for t in texts) + "</tr>")
        out.append("</table>")
    return "".join(out)


def config_section(run_dir: str) -> str:
    p = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(p):
        return "<p>No config.yaml in the run directory.</p>"
    with open(p) as f:
        return f"<pre class='config'>{esc(f.read())}</pre>"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;font-size:13px}
th{background:#f3f3f3}table.num td{text-align:right}table.num td:first-child{text-align:left}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-width:600px}
pre.config{max-width:none;background:#f8f8f8;padding:.5em}.plots img{width:540px;margin:4px}
nav a{margin-right:1em}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}"""


def write_report(run_dirs: Sequence[str], out_dir: str, completion_steps: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Write the PNGs and ``out_dir/index.html`` for one run or a comparison of several.
    Returns ``{"html": path, "plots": [png paths]}``."""
    labels = run_labels(run_dirs)
    runs = dict(zip(labels, (read_metrics(d) for d in run_dirs)))
    plots = plot_panels(runs, out_dir)
    single = len(run_dirs) == 1
    title = f"rlkit report: {labels[0]}" if single else "rlkit comparison: " + " vs ".join(labels)
    sources = ", ".join(esc(os.path.abspath(d)) for d in run_dirs)
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} from {sources}</p>",
            "<nav><a href='#summary'>Summary</a><a href='#plots'>Plots</a><a href='#eval'>Evaluation</a>"
            "<a href='#completions'>Completions</a><a href='#config'>Config</a></nav>"]

    summaries = {name: summarize_run(rows) for name, rows in runs.items()}
    keys = list(dict.fromkeys(k for s in summaries.values() for k in s))
    body.append("<h2 id='summary'>Summary</h2>")
    if single:
        body.append(_table(["", labels[0]], [[k, summaries[labels[0]].get(k)] for k in keys], "num"))
    else:
        body.append(_table(["run"] + keys, [[name] + [s.get(k) for k in keys] for name, s in summaries.items()], "num"))

    body.append("<h2 id='plots'>Plots</h2><div class='plots'>")
    for t, p in plots:
        with open(p, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        body.append(f"<img alt='{esc(t)}' title='{esc(t)}' src='data:image/png;base64,{data}'>")
    body.append("</div>" if plots else "<p>No metrics to plot.</p></div>")

    def per_run(section_id: str, heading: str, render) -> None:
        body.append(f"<h2 id='{section_id}'>{esc(heading)}</h2>")
        for name, d in zip(labels, run_dirs):
            content = render(d, runs[name])
            body.append(content if single else f"<details open><summary>{esc(name)}</summary>{content}</details>")

    per_run("eval", "Evaluation", lambda d, rows: eval_section(rows, d))
    n_steps = completion_steps if single else max(1, min(completion_steps, 3))
    per_run("completions", f"Completions (best, worst, one random per step; {n_steps} steps at most)",
            lambda d, rows: completions_section(d, pick_steps([r["step"] for r in rows], n_steps), seed))
    per_run("config", "Config", lambda d, rows: config_section(d))

    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
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
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    for d in args.runs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            raise SystemExit(f"{d}: no metrics.jsonl (is it a run directory?)")
    out = args.out or (os.path.join(args.runs[0], "report") if len(args.runs) == 1 else "report")
    written = write_report(args.runs, out, args.completion_steps, args.seed)
    for p in written["plots"]:
        print(f"wrote {p}")
    for name, d in zip(run_labels(args.runs), args.runs):
        print(ascii_curve([r.get("reward/mean") for r in read_metrics(d)], label=f"{name} reward/mean"))
    print(f"wrote {written['html']}")
    return written["html"]
