"""Evaluation is deterministic at temperature 0 and seeded otherwise (toy model, HF engine, evaluate_rows);
results are written into the run (eval/step_N/), never into the checkpoint's model folder."""
import json

import pytest
import torch

from rlkit.config import DataConfig, EvalConfig
from rlkit.data import load_prompts
from rlkit.evaluation import evaluate_rows, summarize, write_results


@pytest.fixture(scope="module")
def engine_and_rows(toy_model_dir):
    from rlkit.modeling import load_causal_lm, load_tokenizer
    from rlkit.rollout.hf import HFEngine

    tok = load_tokenizer(toy_model_dir)
    lm = load_causal_lm(toy_model_dir, "float32", False)
    # numeric gold answers so the gsm8k checker has something to compare against
    raw = [{"question": f"{a}+{b}=", "answer": f"#### {a + b}"} for a in range(4) for b in range(3)]
    rows = load_prompts(DataConfig(answer_extraction="gsm8k", max_prompt_tokens=32), tok, rows=raw)
    return HFEngine(lm, tok, samples_per_generate_call=64), rows


def run(engine, rows, **kw):
    cfg = EvalConfig(samples_per_prompt=kw.pop("n", 2), temperature=kw.pop("temperature"), checker="gsm8k")
    return evaluate_rows(engine, rows, cfg, max_new_tokens=8, seed=kw.pop("seed", 0), raw=True)


def texts(records):
    return [(r["flexible_answers"], r["lengths"]) for r in records]


def test_greedy_is_deterministic(engine_and_rows):
    engine, rows = engine_and_rows
    a = run(engine, rows, temperature=0.0, seed=0, n=1)
    b = run(engine, rows, temperature=0.0, seed=123, n=1)     # the seed does not matter at temperature 0
    assert a == b
    assert summarize(a) == summarize(b)


def test_greedy_with_several_samples_per_prompt(engine_and_rows):
    engine, rows = engine_and_rows
    a = run(engine, rows, temperature=0.0, n=2)
    for r in a:                                                # greedy: every sample of a prompt is the same
        assert len(set(map(str, r["flexible_answers"]))) == 1 and len(set(r["lengths"])) == 1


def test_sampling_is_seeded(engine_and_rows):
    engine, rows = engine_and_rows
    a = run(engine, rows, temperature=1.0, seed=7, n=4)
    b = run(engine, rows, temperature=1.0, seed=7, n=4)
    c = run(engine, rows, temperature=1.0, seed=8, n=4)
    assert a == b and summarize(a) == summarize(b)
    assert texts(a) != texts(c)                                # another seed, other samples


def test_evaluation_leaves_the_global_rng_alone(engine_and_rows):
    engine, rows = engine_and_rows
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    run(engine, rows, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)                # training's RNG stream is not perturbed


def test_results_json_in_the_run_not_the_model_folder(tmp_path, engine_and_rows):
    from rlkit.evaluation import read_results, results_dir

    engine, rows = engine_and_rows
    res = summarize(run(engine, rows, temperature=1.0, n=2))
    model_dir = tmp_path / "checkpoints" / "step_5" / "model"
    model_dir.mkdir(parents=True)
    out_dir, step = results_dir(str(model_dir), None)
    assert (out_dir, step) == (str(tmp_path / "eval" / "step_5"), 5)
    path = write_results(res, out_dir, "test__x", {"model": str(model_dir)})
    assert path == str(tmp_path / "eval" / "step_5" / "test__x.json") and list(model_dir.iterdir()) == []
    assert read_results(path) == pytest.approx(res)
    assert {"strict/pass@1", "flexible/pass@2", "strict/maj@2", "format_rate", "num_prompts"} <= set(res)
    from rlkit.report import checkpoint_evals

    assert checkpoint_evals(str(tmp_path)) == [(5, "test__x", read_results(path))]


def test_progress_chunks_sample_what_one_call_samples(engine_and_rows):
    """The CLI's progress bar feeds the engine one chunk at a time (seed + offset per chunk): the samples are
    those of one call whose engine chunks the same way.  Mutation check: without the per-chunk seed this fails."""
    from rlkit.tracking import Progress

    engine, rows = engine_and_rows
    cfg = EvalConfig(samples_per_prompt=2, temperature=1.0, checker="gsm8k")
    old = engine.max_batch
    engine.max_batch = 8                                       # 4 prompts per engine call
    try:
        one = evaluate_rows(engine, rows, cfg, max_new_tokens=8, seed=3, raw=True)
        lines = []
        prog = Progress(len(rows), "eval", bar=False, unit="prompts", print_fn=lambda *a, **k: lines.append(a[0]))
        chunked = evaluate_rows(engine, rows, cfg, max_new_tokens=8, seed=3, raw=True, progress=prog, prompts_per_call=4)
    finally:
        engine.max_batch = old
    assert texts(chunked) == texts(one) and chunked == one
    assert [ln.split(" (")[0] for ln in lines] == ["eval: 4/12 prompts", "eval: 8/12 prompts", "eval: 12/12 prompts"]
