"""Prompt datasets.

Sources: a hub dataset (``datasets.load_dataset(name, config, split=...)``), a
local ``.jsonl`` / ``.json`` / ``.parquet`` file, or an in-memory list of dicts.
Each row becomes::

    {"prompt": <formatted text>, "prompt_ids": [...], "answer": <extracted gold>,
     "answer_text": <original answer field>, <every other dataset column>}

``answer`` is the gold answer after extraction (``gsm8k``: the text after
``####``; ``boxed``: the last ``\\boxed{}``), which is what reward functions
receive as their ``answer`` keyword.  A row that lacks a mapped field raises a
:class:`DataError` naming the row index and the field.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from .config import DataConfig


class DataError(ValueError):
    pass


def _is_local(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".parquet")) or os.path.sep in path and os.path.exists(path)


def load_raw_rows(path: Any, name: Optional[str] = None, split: str = "train", max_rows: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows as plain dicts from a hub name, a local file, or an in-memory list."""
    if isinstance(path, (list, tuple)):
        rows = [dict(r) for r in path]
    else:
        import datasets

        if not path:
            raise DataError("data.path is empty: give a hub dataset name or a local .jsonl/.json/.parquet file")
        if _is_local(path):
            if not os.path.exists(path):
                raise DataError(f"data file not found: {path}")
            kind = "parquet" if path.endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=path, split="train")
        else:
            try:
                ds = datasets.load_dataset(path, name, split=split)
            except Exception as e:  # network / unknown dataset
                raise DataError(f"could not load dataset {path!r} (config {name!r}, split {split!r}): {e}") from e
        if max_rows is not None:
            ds = ds.select(range(min(max_rows, len(ds))))
        rows = [dict(r) for r in ds]
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"dataset {path!r} has no rows")
    return rows


def extract_answer(text: Any, mode: str) -> Optional[str]:
    if text is None:
        return None
    text = str(text)
    if mode == "none":
        return text.strip()
    from .answers import extract_gsm8k_gold, extract_last_boxed

    if mode == "gsm8k":
        return extract_gsm8k_gold(text)
    if mode == "boxed":
        return extract_last_boxed(text)
    raise DataError(f"data.answer_extraction: unknown mode {mode!r}")


def prepare_rows(raw: Sequence[Dict[str, Any]], cfg: DataConfig, source: str = "data") -> List[Dict[str, Any]]:
    """Validate fields and format prompts (no tokenizer needed)."""
    out = []
    for i, r in enumerate(raw):
        if cfg.prompt_field not in r or r[cfg.prompt_field] is None:
            raise DataError(f"{source} row {i}: missing prompt field {cfg.prompt_field!r} (data.prompt_field); columns: {sorted(r)}")
        row = dict(r)
        if cfg.answer_field:
            if cfg.answer_field not in r or r[cfg.answer_field] is None:
                raise DataError(f"{source} row {i}: missing answer field {cfg.answer_field!r} (data.answer_field); columns: {sorted(r)}")
            row["answer_text"] = r[cfg.answer_field]
            row["answer"] = extract_answer(r[cfg.answer_field], cfg.answer_extraction)
        try:
            row["prompt"] = cfg.template.format(prompt=r[cfg.prompt_field], **{k: v for k, v in r.items() if k != "prompt"})
        except KeyError as e:
            raise DataError(f"{source} row {i}: data.template uses {{{e.args[0]}}} which is not a column; columns: {sorted(r)}") from None
        out.append(row)
    return out


def encode_prompt(tokenizer, text: str, chat_template: bool = False, system_prompt: Optional[str] = None) -> List[int]:
    """Prompt token ids: the tokenizer's chat template with a generation prompt, or plain text."""
    if chat_template:
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = (system_prompt + "\n" if system_prompt else "") + text
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def tokenize_rows(rows: List[Dict[str, Any]], cfg: DataConfig, tokenizer) -> List[Dict[str, Any]]:
    """Add ``prompt_ids`` (chat template or plain text); drop over-long prompts."""
    kept = []
    for r in rows:
        ids = encode_prompt(tokenizer, r["prompt"], cfg.chat_template, cfg.system_prompt)
        if len(ids) > cfg.max_prompt_tokens:
            continue
        r["prompt_ids"] = ids
        kept.append(r)
    dropped = len(rows) - len(kept)
    if not kept:
        raise DataError(f"every prompt is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}")
    if dropped:
        import logging

        logging.getLogger("rlkit").warning("dropped %d prompts longer than data.max_prompt_tokens=%d", dropped, cfg.max_prompt_tokens)
    return kept


def load_prompts(cfg: DataConfig, tokenizer=None, split: str = "train", rows: Any = None) -> List[Dict[str, Any]]:
    if split == "train":
        raw = load_raw_rows(rows if rows is not None else cfg.path, cfg.name, cfg.split, cfg.max_rows)
        source = str(cfg.path) if rows is None else "in-memory data"
    else:
        path = rows if rows is not None else (cfg.eval_path or cfg.path)
        raw = load_raw_rows(path, cfg.eval_name if cfg.eval_path else cfg.name, cfg.eval_split, cfg.eval_max_rows)
        source = str(path) if rows is None else "in-memory eval data"
    prepared = prepare_rows(raw, cfg, source)
    return tokenize_rows(prepared, cfg, tokenizer) if tokenizer is not None else prepared
