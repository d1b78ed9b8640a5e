"""End to end the way users launch, with two real processes on CPU.

``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x (its MULTI_CPU
launcher needs an MPI hostfile), so the test uses accelerate's torchrun-based launcher; rlkit sees no GPU
and joins the two processes with gloo (see launch/accelerate_cpu.yaml).  ``world_size`` in the metrics
proves both ranks took part."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_accelerate_two_process_grpo_reward_rises(tmp_path, toy_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml",
           f"model.name_or_path={toy_model_dir}", f"data.path={REPO}/recipes/data/echo_train.jsonl",
           f"data.eval_path={REPO}/recipes/data/echo_test.jsonl", f"reward.functions=[{REPO}/rewards/toy.py:echo]",
           "trainer.total_steps=16", "trainer.lr=1e-2", "trainer.prompts_per_step=16", f"trainer.output_dir={tmp_path}",
           "trainer.run_name=e2e", "trainer.save_every=8", "trainer.progress_bar=false", "eval.every_steps=8",
           "eval.max_prompts=16"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    run = tmp_path / "e2e"
    m = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in m] == list(range(1, 17))
    assert all(x["world_size"] == 2 for x in m)
    r = [x["reward/mean"] for x in m]
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.03, r
    assert m[-1]["train/samples"] == 16 * 8 / 2  # each rank trains its own 8 prompts x 8 samples
    assert "eval/strict/pass@1" in m[7] and "eval/strict/pass@1" in m[15]
    assert all(x["logprob_gap/mean"] < 1e-4 for x in m)
    # both ranks' completions are in the log
    comps = [json.loads(l) for l in open(run / "completions.jsonl")]
    assert len(comps) == 16 * 16 * 8
    # checkpoints: HF-format model loadable with from_pretrained
    from transformers import AutoModelForCausalLM

    ck = run / "checkpoints" / "step_16" / "model"
    AutoModelForCausalLM.from_pretrained(ck)


def test_two_processes_uneven_work_do_not_hang(tmp_path, toy_model_dir):
    """DAPO drops different groups on each rank (refill rounds, uneven micro-batch counts), with a scoring pass,
    a reference model and several mini-batches: every collective must still line up."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "launch" / "train.py"),
           f"recipe={REPO}/recipes/quickstart.yaml", f"model.name_or_path={toy_model_dir}",
           f"data.path={REPO}/recipes/data/echo_train.jsonl", f"data.eval_path={REPO}/recipes/data/echo_test.jsonl",
           f"reward.functions=[{REPO}/rewards/toy.py:echo]", "trainer.total_steps=4", "trainer.prompts_per_step=8",
           "rollout.samples_per_prompt=4", "trainer.ppo_epochs=2", "trainer.samples_per_minibatch=8",
           "trainer.tokens_per_microbatch=40", "algorithm.kl.coef=0.01",
           "algorithm.filters=[{name: dapo_dynamic_sampling, max_refill_rounds: 2}]",
           f"trainer.output_dir={tmp_path}", "trainer.run_name=uneven", "trainer.progress_bar=false", "trainer.save_every=2"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    m = [json.loads(l) for l in open(tmp_path / "uneven" / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in m)
    assert all(r["kl/mean"] >= 0 for r in m)
