"""``toy:<size>-tool``: a toy chat model that knows the Hermes tool-call format, for the CPU tiny profile of
``recipes/grpo_gsm8k_tool.yaml`` and its end-to-end test.

The plain ``toy:`` tokenizer spells only ``a-z0-9 =+#.:``, so a random toy model can never write
``<tool_call>{"name": ...}``.  This variant has:

* a character-level vocabulary over printable ASCII plus newline, ``<|im_start|>`` / ``<|im_end|>`` (special;
  ``<|im_end|>`` is EOS) and ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>`` as
  single, non-special tokens (as in Qwen2.5's vocabulary, so they survive ``skip_special_tokens``), plus a few
  multi-character pieces of the call's JSON (:data:`MERGES`);
* a compact ChatML chat template that accepts ``tools=`` (each tool rendered as ``name(arg,...)`` in the system
  turn) and renders ``tool`` messages as ``<tool_response>...</tool_response>`` user turns;
* weights trained by :data:`TOOL_SFT_STEPS` supervised steps (seeded, a few seconds on CPU) on synthetic
  conversations in GSM8K's format: the user asks ``What is a + b?`` (``+``, ``-`` or ``*``), the assistant
  calls ``python`` with ``print(a + b)``, the tool's output comes back, the assistant answers ``#### N``.
  The loss covers the assistant turns only (the tool turn is masked, as in RL).

So a sampled turn is a real tool call in most episodes, parsed by the ``hermes`` parser and run in the Python
sandbox; the copy of the numbers is imperfect after so little training, which leaves the RL something to learn.
Nothing is scripted at rollout time: every token is sampled from this model.
"""
from __future__ import annotations

import json
import random
import string
from typing import Dict, List

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# multi-character pieces, as a BPE vocabulary trained on tool-calling text would have them (the text is the same;
# the sequences are ~3x shorter, so a few dozen supervised steps teach the format)
MERGES = ['{"name": "', '", "arguments": {"', '": "', '"}}', "python", "code", "print(", "tools:", "What is ", "#### ",
          "system", "user", "assistant"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]      # printable ASCII + "\n"
TOOL_SFT_STEPS = 60

CHAT_TEMPLATE = (
    "{%- if tools or messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% if tools %}{{ '\\n' }}{% endif %}{% endif %}"
    "{%- if tools %}{{ 'tools:' }}{% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    "{{ ' ' + f['name'] + '(' + (f['parameters']['properties'] | list | join(',')) + ')' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>' + m['content'] + '</tool_response><|im_end|>\\n' }}"
    "{%- elif m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tool_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS + MERGES])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>")
    out.chat_template = CHAT_TEMPLATE
    return out


def arith_rows(n: int, seed: int = 0) -> List[Dict[str, str]]:
    """GSM8K-format rows ``{"question": "What is 12 + 7?", "answer": "12 + 7 = 19\\n#### 19"}``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = rng.randint(2, 49), rng.randint(2, 19 if op == "*" else 49)
        v = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"question": f"What is {a} {op} {b}?", "answer": f"{a} {op} {b} = {v}\n#### {v}"})
    return rows


def _episode(tok, schemas, row) -> tuple:
    """(ids, labels) of one demonstration: prompt (with tools=) -> call -> tool result (masked) -> answer."""
    expr = row["answer"].split(" = ")[0]
    value = row["answer"].rsplit("#### ", 1)[1]
    call = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": f"print({expr})"}}) + "</tool_call>"
    msgs = [{"role": "user", "content": row["question"]}]
    prompt = tok.apply_chat_template(msgs, tools=schemas, tokenize=False, add_generation_prompt=True)
    # what multi_turn appends after a turn that stopped at </tool_call>: the end of the turn, the tool turn, the
    # next generation prompt (rlkit.envs.chat.observation_text)
    obs = f"<|im_end|>\n<|im_start|>user\n<tool_response>{value}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    pieces = [(prompt, False), (call, True), (obs, False), (f"#### {value}", True)]
    ids, labels = [], []
    for text, learn in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if learn else [-100] * len(t)
    ids.append(tok.eos_token_id)
    labels.append(tok.eos_token_id)
    return ids, labels


def _sft(model, tok, steps: int, seed: int = 1, batch: int = 16, lr: float = 1e-2) -> None:
    import torch

    from ..tools import python, tool_schema

    schemas = [tool_schema(python)]
    data = [_episode(tok, schemas, r) for r in arith_rows(256, seed=seed + 1000)]   # not the recipe's rows
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        b = rng.sample(data, batch)
        L = max(len(x) for x, _ in b)
        ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x, _ in b])
        lab = torch.tensor([y + [-100] * (L - len(y)) for _, y in b])
        att = (torch.arange(L)[None] < torch.tensor([len(x) for x, _ in b])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_tool_model_dir(path: str, size: str, sizes: Dict[str, dict], steps: int = TOOL_SFT_STEPS, seed: int = 0) -> str:
    """Write the ``toy:<size>-tool`` model + tokenizer (with chat template) in HF format to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tool_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                      **sizes[size])
    with torch.random.fork_rng(devices=[]):  # never perturb the caller's RNG stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        _sft(model, tok, steps)
    model.generation_config.eos_token_id = tok.eos_token_id
    from ..toy import save_model_dir

    return save_model_dir(model, tok, path)
