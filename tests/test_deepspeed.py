"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate's launcher (one CPU process: the engine path, rlkit's own
gradient-accumulation boundary, DeepSpeed checkpoints and resume).  Several DeepSpeed processes need GPUs."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install 'rlkit[deepspeed]')")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_checkpoints_and_resumes(tmp_path, toy_model_dir, stage):
    with open(REPO / "launch" / f"ds_zero{stage}.json") as f:
        ds = json.load(f)
    ds.pop("bf16", None)  # fp32 on CPU
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "acc.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n  zero3_init_flag: false\n"
        "num_processes: 1\nnum_machines: 1\nmachine_rank: 0\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def run(*extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "acc.yaml"),
               str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml", f"model.name_or_path={toy_model_dir}",
               f"data.path={REPO}/recipes/data/echo_train.jsonl", "data.eval_path=null",
               f"reward.functions=[{REPO}/rewards/toy.py:echo]", "trainer.prompts_per_step=4", "rollout.samples_per_prompt=4",
               "trainer.ppo_epochs=2", "trainer.tokens_per_microbatch=40", f"trainer.output_dir={tmp_path}",
               "trainer.run_name=ds", "trainer.progress_bar=false", "trainer.save_every=2", *extra]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        return p

    p = run("trainer.total_steps=2")
    assert "DistributedType.DEEPSPEED" in p.stderr
    run("trainer.total_steps=3", "trainer.resume=auto")
    m = [json.loads(l) for l in open(tmp_path / "ds" / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2, 3]
    assert all(r["logprob_gap/mean"] < 1e-4 for r in m)
    # every step updates the weights: the second PPO epoch sees a ratio != 1 (DeepSpeed steps inside backward, and
    # the grad norm it reports is its engine's last computed one, which can read 0 for a step, so it is not the proof)
    assert all(abs(r["ppo_kl/mean"]) > 0 for r in m) and any(r["grad_norm"] > 0 for r in m)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ds" / "checkpoints" / "step_3" / "model")
