"""A tiny, self-contained model and task for the quickstart, tests and benchmarks.

``toy:<name>`` as ``model.name_or_path`` materialises a randomly initialised
Llama (2 layers, hidden 64) with a character-level tokenizer into
``$RLKIT_CACHE`` (default ``~/.cache/rlkit``) once, and every later load goes
through the ordinary ``from_pretrained``.  Nothing is downloaded.

The echo task: the prompt is a string of letters; the reward is the fraction
of the first ``k`` completion characters equal to the prompt's last letter.  A
random model scores about 1/30; a policy that learns to echo scores 1.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 =+#.:")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    # benchmarks/opsd_memory.py: students and teachers with 4x their parameters (2.6M / 10.5M / 42M), same tokenizer
    "medium": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "large": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "xl": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16),
}
# Trained variants, made once by ECHO_SFT_STEPS supervised steps (seeded; a few seconds):
# ``toy:<size>-echo``: answers the echo task (a teacher that knows the task, for OPD's tiny profile; toy:small-echo
#     has 4x the parameters of toy:tiny and the same tokenizer);
# ``toy:<size>-hint``: copies a hint, ``"answer: x " + prompt`` -> x (x a random letter, unrelated to the prompt), and
#     never saw a prompt without a hint: OPSD's tiny profile, whose teacher reads the hint and whose student does not.
ECHO_SFT_STEPS = 100
# ``toy:<size>-tool``: a chat model (printable-ASCII vocabulary, chat template with tools=) that writes Hermes tool
#     calls, for recipes/grpo_gsm8k_tool.yaml's tiny profile (rlkit/envs/toy_tool.py).
VARIANTS = ("-echo", "-hint", "-tool")


def cache_dir() -> str:
    return os.environ.get("RLKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlkit"))


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sft_echo(model, tok, steps: int, seed: int = 1, k: int = 8, hint: bool = False) -> None:
    """Supervised fine-tuning on echo rows (prompt -> the gold letter k times, then EOS; ``hint``: the prompt
    ``"answer: x " + question`` -> x, a random letter); deterministic, a few seconds."""
    import torch

    rows = echo_rows(4096, seed=seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        seqs, labels = [], []
        for r in rng.sample(rows, 32):
            q, a = r["question"], r["answer"]
            if hint:
                a = rng.choice("abcdefgh")
                q = f"answer: {a} {q}"
            p = tok(q)["input_ids"]
            c = tok(a * k, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        L = max(map(len, seqs))
        ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x in seqs])
        lab = torch.tensor([x + [-100] * (L - len(x)) for x in labels])
        att = (torch.arange(L)[None] < torch.tensor([len(x) for x in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_model_dir(path: str, size: str = "tiny", seed: int = 0, echo_steps: int = 0, hint: bool = False) -> str:
    """Write a random-init tiny Llama + tokenizer in HF format to ``path`` (``echo_steps`` > 0: then trained
    that many supervised steps on the echo task, with a hint in the prompt if ``hint``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=True, **SIZES[size])
    with torch.random.fork_rng(devices=[]):  # never perturb the caller's RNG stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        if echo_steps:
            _sft_echo(model, tok, echo_steps, hint=hint)
    return save_model_dir(model, tok, path)


def save_model_dir(model, tok, path: str) -> str:
    """Write a model directory atomically (a temporary directory renamed into place); when another process made
    ``path`` first, keep theirs."""
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve(name_or_path: str) -> str:
    """``toy:<size>`` -> a local directory (created once); ``gguf:SRC`` -> the converted, cached HF directory
    (:mod:`rlkit.gguf`); anything else unchanged."""
    if isinstance(name_or_path, str) and name_or_path.startswith("gguf:"):
        from .gguf import resolve as resolve_gguf

        return resolve_gguf(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.startswith("toy:"):
        return name_or_path
    name = name_or_path.split(":", 1)[1] or "tiny"
    variant = next((v for v in VARIANTS if name.endswith(v)), "")
    size = name[:len(name) - len(variant)]
    if size not in SIZES:
        raise ValueError(f"unknown toy model {name_or_path!r}; known: {', '.join('toy:' + s for s in SIZES)} "
                         f"(and toy:<size>-echo, toy:<size>-hint, toy:<size>-tool)")
    path = os.path.join(cache_dir(), f"toy-{name}")
    if not os.path.exists(os.path.join(path, "config.json")):
        if variant == "-tool":
            from .envs.toy_tool import make_tool_model_dir

            make_tool_model_dir(path, size, SIZES)
        else:
            make_model_dir(path, size, echo_steps=ECHO_SFT_STEPS if variant else 0, hint=variant == "-hint")
    return path


def echo_rows(n: int, seed: int = 0, min_len: int = 3, max_len: int = 8) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    letters = "abcdefgh"
    rows = []
    for _ in range(n):
        s = "".join(rng.choice(letters) for _ in range(rng.randint(min_len, max_len)))
        rows.append({"question": s + ":", "answer": s[-1]})
    return rows


def write_echo_jsonl(path: str, n: int, seed: int) -> None:
    with open(path, "w") as f:
        for r in echo_rows(n, seed):
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":  # python -m rlkit.toy DIR [tiny|small]
    import sys

    make_model_dir(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tiny")
    print(f"wrote {sys.argv[1]}")
