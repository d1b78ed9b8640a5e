"""Smoke runs of the asynchronous-RL benchmarks (issue 11): benchmarks/async_speedup.py --quick and
benchmarks/gpu_async.sh --cpu.  Slow (minutes on 2 cores) and they need ../shared (stories260K, the Qwen3 tokenizer)."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared_path

pytestmark = pytest.mark.slow


def test_async_speedup_quick_runs_both_modes(tmp_path):
    model = shared_path("models", "stories260K-hf")
    out = tmp_path / "async.json"
    env = dict(os.environ, RLKIT_STORIES260K=str(model), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "benchmarks/async_speedup.py", "--quick", "--silent", "--json", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["k"] for r in runs) == [0, 1]
    for r in runs:
        assert len(r["step_wall"]) == 2 and all(math.isfinite(x) for x in r["rewards"])   # rewards were scored
    k1 = next(r for r in runs if r["k"] == 1)
    assert k1["async"]["async/staleness"] == 1.0       # step 2 trained the batch generated before step 1's update
    assert "wait_for_rollout" in k1["times"] and "weight_transfer" in k1["times"]
    assert "throughput k=1 / k=0" in p.stdout


def test_gpu_async_cpu_smoke_every_stage_reports(tmp_path):
    tok = shared_path("tokenizers", "qwen3")
    env = dict(os.environ, RLKIT_QWEN3_TOKENIZER=str(tok))
    p = subprocess.run(["bash", "benchmarks/gpu_async.sh", "--cpu", "--out", str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert {k: v.get("error") for k, v in res.items() if "error" in v} == {}
    assert res["grpo_k1"]["transport"] and res["grpo_k1"]["steps"] >= 2
    assert all(p_["exact"] for p_ in res["transfer"]["plans"])
    gen = res["gen"]["engines"]
    assert len({e["tokens"] for e in gen.values()}) == 1          # every engine generated the same number of tokens
    assert (tmp_path / "summary.md").read_text().rstrip().endswith("|")   # the table is the last thing written
