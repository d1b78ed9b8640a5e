"""The embedded Hugging Face engine: log-prob convention, greedy, stop strings, prefixes, truncation."""
import pytest
import torch

from rlkit.modeling import load_causal_lm, load_tokenizer
from rlkit.rollout.base import SamplingParams
from rlkit.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def engine(toy_model_dir):
    tok = load_tokenizer(toy_model_dir)
    return HFEngine(load_causal_lm(toy_model_dir), tok), tok


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
