"""The embedded Hugging Face engine: log-prob convention, greedy, stop strings, prefixes, truncation.

Every engine test runs for both decode paths (``rollout.engine_args.decode``): ``lean`` (rlkit's own decode loop,
the default) and ``generate`` (HF ``generate`` plus rlkit's logits processors)."""
import pytest
import torch

from rlkit.modeling import load_causal_lm, load_tokenizer
from rlkit.rollout.base import SamplingParams
from rlkit.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    return load_causal_lm(toy_model_dir), load_tokenizer(toy_model_dir)


@pytest.fixture(params=["lean", "generate"])
def engine(request, toy):
    model, tok = toy
    return HFEngine(model, tok, decode=request.param), tok


def teacher_forced(model, prompt, ids, temperature):
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def test_logprobs_are_temperature_scaled_before_truncation(engine):
    eng, tok = engine
    torch.manual_seed(0)
    prompts = [tok("abc:")["input_ids"], tok("hgfe:")["input_ids"]]
    out = eng.generate(prompts, 3, SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=10))
    assert len(out) == 2 and all(len(r) == 3 for r in out)
    for p, row in zip(prompts, out):
        for c in row:
            ref = teacher_forced(eng.model, p, c.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=1e-5)


def test_greedy_matches_generate_and_copies_samples(engine):
    eng, tok = engine
    p = tok("dcba:")["input_ids"]
    out = eng.generate([p], 2, SamplingParams(temperature=0.0, max_new_tokens=8))
    ref = eng.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(p):].tolist()
    ref = ref[: ref.index(2) + 1] if 2 in ref else ref
    assert out[0][0].token_ids == ref and out[0][1].token_ids == ref
    torch.testing.assert_close(torch.tensor(out[0][0].logprobs), teacher_forced(eng.model, p, ref, 1.0), atol=1e-5, rtol=1e-5)


def test_stop_strings_and_truncation(engine):
    eng, tok = engine
    torch.manual_seed(1)
    stops = ["a", "b", "c", "d", "e"]
    out = eng.generate([tok("abc:")["input_ids"]] * 4, 4, SamplingParams(temperature=1.0, max_new_tokens=16, stop=stops))
    comps = [c for row in out for c in row]
    hit = [c for c in comps if any(s in c.text for s in stops)]
    assert hit
    for c in hit:   # generation ends at the token that completes the first stop string
        assert c.finish_reason == "stop" and c.text[-1] in stops and not any(s in c.text[:-1] for s in stops)
    for c in comps:
        if c not in hit:
            assert c.finish_reason in ("length", "stop") and (c.finish_reason == "stop" or len(c.token_ids) == 16)


def test_prefix_continuation(engine):
    eng, tok = engine
    prompt = tok("abc:")["input_ids"]
    prefix = tok("xyz", add_special_tokens=False)["input_ids"]
    out = eng.generate([prompt + prefix], 1, SamplingParams(temperature=0.0, max_new_tokens=5))
    full = eng.model.generate(torch.tensor([prompt + prefix]), do_sample=False, max_new_tokens=5, pad_token_id=0)[0].tolist()
    cont = full[len(prompt + prefix):]
    cont = cont[: cont.index(2) + 1] if 2 in cont else cont
    assert out[0][0].token_ids == cont


def test_lean_draws_what_generate_draws_while_no_row_finishes(toy):
    """Same seed, no row can finish (the model's generation_config.min_new_tokens masks EOS, which the lean loop must
    honour as generate does): the lean loop makes generate's very draws, so tokens and log-probs agree."""
    model, tok = toy
    prompts = [tok("abc:")["input_ids"], tok("hgfedcba:")["input_ids"]]   # different lengths: left padding
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=25, max_new_tokens=12, seed=7)
    old = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = 12
    try:
        lean, gen = (HFEngine(model, tok, decode=d).generate(prompts, 4, sp) for d in ("lean", "generate"))
    finally:
        model.generation_config.min_new_tokens = old
    a, b = [c for r in lean for c in r], [c for r in gen for c in r]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in a + b)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]), torch.tensor([c.logprobs for c in b]), atol=1e-6, rtol=0)


def test_lean_drops_finished_rows_keeps_logprobs_exact_and_is_seeded(toy):
    """Rows that end at EOS leave the lean loop's batch (their KV-cache rows are dropped); the rows that go on keep
    exact log-probs (positions, mask and cache stay aligned), and a seed reproduces the call."""
    model, tok = toy
    eng = HFEngine(model, tok, decode="lean")
    prompts = [tok(s)["input_ids"] for s in ("ab:", "hgfe:", "zyxwvut:", "q:")]
    sp = SamplingParams(temperature=1.3, max_new_tokens=24, seed=3)
    out = eng.generate(prompts, 6, sp)
    lens = [len(c.token_ids) for row in out for c in row]
    assert min(lens) < 12 and max(lens) > min(lens) + 4         # early finishers and long rows in one batch
    for p, row in zip(prompts, out):
        for c in row:
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == 2)
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(model, p, c.token_ids, 1.3), atol=1e-5, rtol=1e-5)
    again = eng.generate(prompts, 6, sp)
    assert [[c.token_ids for c in r] for r in again] == [[c.token_ids for c in r] for r in out]
    other = eng.generate(prompts, 6, SamplingParams(temperature=1.3, max_new_tokens=24, seed=4))
    assert [[c.token_ids for c in r] for r in other] != [[c.token_ids for c in r] for r in out]


def test_lean_falls_back_to_generate_for_generation_config_it_does_not_implement(toy):
    model, tok = toy
    eng = HFEngine(model, tok, decode="lean")
    assert eng._use_lean(model)
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not eng._use_lean(model)
    finally:
        model.generation_config.repetition_penalty = old


def test_decode_engine_arg_is_checked_at_config_time():
    from rlkit.config import ConfigError, load_config
    from tests.conftest import REPO

    base = ["model.name_or_path=toy:tiny", f"reward.functions=[{REPO}/rewards/toy.py:echo]"]
    assert load_config(base + ["rollout.engine_args={decode: generate}"]).rollout.engine_args == {"decode": "generate"}
    with pytest.raises(ConfigError, match=r"^rollout.engine_args.decode='fast': use one of \['lean', 'generate'\]$"):
        load_config(base + ["rollout.engine_args={decode: fast}"])
    with pytest.raises(ConfigError, match=r"^rollout.engine_args: unknown hf engine option\(s\) \['decoder'\]"):
        load_config(base + ["rollout.engine_args={decoder: lean}"])


@pytest.mark.parametrize("decode", ["lean", "generate"])
def test_trainer_recomputes_the_engines_logprobs(tmp_path, echo_rows, decode):
    """The weight-sync gap: the trainer's recomputed log-probs equal the engine's to fp32 precision, with temperature
    and top-p/top-k on (the convention: softmax(logits / T) before truncation)."""
    from rlkit.config import load_config
    from rlkit.trainer import Trainer
    from tests.conftest import read_metrics, tiny_overrides

    cfg = load_config(tiny_overrides(tmp_path, **{"trainer.total_steps": 1, "rollout.temperature": 0.7, "rollout.top_p": 0.8,
                                                  "rollout.top_k": 20, "rollout.max_new_tokens": 10,
                                                  "rollout.engine_args": "{decode: %s}" % decode}))
    tr = Trainer(cfg, train_rows=echo_rows)
    assert tr.engine.decode == decode
    tr.train()
    m = read_metrics(tr.run_dir)[0]
    assert m["logprob_gap/mean"] < 1e-5 and m["logprob_gap/max"] < 1e-4, m


@pytest.mark.realmodel
def test_lean_matches_generate_on_pretrained_stories260k():
    """The pretrained stories260K (``../shared``): greedy is generate's greedy (and its log-probs teacher forcing's),
    and with EOS masked the seeded draws and log-probs are generate's."""
    from tests.conftest import shared_path

    path = shared_path("models", "stories260K-hf")
    model, tok = load_causal_lm(str(path)), load_tokenizer(str(path))
    prompts = [tok(s)["input_ids"] for s in ("Once upon a time", "The cat", "Tom and Lily went to the park. They")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=16, seed=5)
    old = model.generation_config.min_new_tokens
    try:
        g = {d: HFEngine(model, tok, decode=d).generate(prompts, 1, greedy) for d in ("lean", "generate")}
        model.generation_config.min_new_tokens = 16
        s = {d: HFEngine(model, tok, decode=d).generate(prompts, 4, sp) for d in ("lean", "generate")}
    finally:
        model.generation_config.min_new_tokens = old
    assert [r[0].token_ids for r in g["lean"]] == [r[0].token_ids for r in g["generate"]]
    assert [[c.token_ids for c in r] for r in s["lean"]] == [[c.token_ids for c in r] for r in s["generate"]]
    torch.testing.assert_close(torch.tensor([[c.logprobs for c in r] for r in s["lean"]]),
                               torch.tensor([[c.logprobs for c in r] for r in s["generate"]]), atol=1e-5, rtol=0)
    for p, row in zip(prompts, g["lean"]):   # (EOS masking shifts the sampled rows' log-probs by log(1 - p_eos))
        torch.testing.assert_close(torch.tensor(row[0].logprobs), teacher_forced(model, p, row[0].token_ids, 1.0), atol=1e-4, rtol=1e-4)
