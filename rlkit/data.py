"""Prompt datasets.

Sources: a hub dataset (``datasets.load_dataset(name, config, split=...)``), a
local ``.jsonl`` / ``.json`` / ``.parquet`` file, or an in-memory list of dicts.
Each row becomes::

    {"prompt": <formatted text>, "prompt_ids": [...], "row_id": <position>, "answer": <extracted gold>,
     "answer_text": <original answer field>, <every other dataset column>}

``answer`` is the gold answer after extraction (``gsm8k``: the text after
``####``; ``boxed``: the last ``\\boxed{}``), which is what reward functions
receive as their ``answer`` keyword.

Local ``.jsonl`` / ``.json`` files are read with the ``json`` module, so every problem
is one :class:`DataError` naming the file and line (``FILE:LINE: ...``): a missing or
empty file, a malformed line, a line that is not an object, a byte that is not UTF-8.
Rows that lack a column get ``None`` there.  A row that lacks a mapped field raises a
:class:`DataError` naming the line (or row index) and the field.

Value types (:func:`check_text_value`): the prompt and answer fields hold text.  A
number or bool there is converted to text, with one warning per column naming it; a
list or dict is rejected naming the row and the column, except a prompt that is a list
of ``{role, content}`` messages (a conversational prompt, TRL's ``prompt`` column), which is kept as is
and rendered by the tokenizer's chat template whatever ``data.chat_template`` says (``data.template``
does not apply to it; ``data.system_prompt`` is prepended unless the messages hold a system turn).  A
tokenizer without a chat template makes that a :class:`DataError` naming the row.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence

from .config import DataConfig


logger = logging.getLogger("rlkit")


class DataError(ValueError):
    """A bad data file or row; printed as one line, ``data error: FILE:LINE: ...``."""

    kind = "data"


def _is_local(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".parquet")) or os.path.sep in path and os.path.exists(path)


def _read_text(path: str) -> str:
    """The file as text; an empty file or a non-UTF-8 byte is a :class:`DataError` naming the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file: {e.strerror or e}") from None
    if not data.strip():
        raise DataError(f"{path}:1: the data file is empty (expected one JSON object per line)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
                        "save the file as UTF-8") from None


def _read_json_lines(path: str, text: str):
    """-> (rows, 1-based line of each row).  A malformed or non-object line is a :class:`DataError` naming it."""
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got a {type(obj).__name__}")
        rows.append(obj)
        lines.append(n)
    return rows, lines


def _read_json(path: str, text: str):
    """A ``.json`` file: a list of objects, a dict of equal-length columns, or JSON lines."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON lines in a .json file
            return _read_json_lines(path, text)
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()) \
            and len({len(v) for v in obj.values()}) == 1:
        obj = [dict(zip(obj, vals)) for vals in zip(*obj.values())]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of JSON objects (or JSON lines), got a {type(obj).__name__}")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{path}: item {i} is a {type(r).__name__}, expected a JSON object")
    return obj, None


def _fill_columns(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every row gets every column (None where a row lacks it), as a datasets table would."""
    keys: Dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return [r if len(r) == len(keys) else {k: r.get(k) for k in keys} for r in rows]


def _load_rows(path: Any, name: Optional[str] = None, split: str = "train", max_rows: Optional[int] = None):
    """-> (rows as plain dicts, their line numbers in a JSON-lines file or None)."""
    lines = None
    if isinstance(path, (list, tuple)):
        rows = [dict(r) for r in path]
    else:
        if not path:
            raise DataError("data.path is empty: give a hub dataset name or a local .jsonl/.json/.parquet file")
        if os.path.isfile(path) and not path.endswith((".jsonl", ".json", ".parquet")):
            raise DataError(f"{path}: unsupported data file type; give a .jsonl, .json or .parquet file (or a hub dataset name)")
        if _is_local(path):
            if not os.path.exists(path):
                raise DataError(f"{path}: data file not found (relative to {os.getcwd()})")
            if os.path.isdir(path):
                raise DataError(f"{path}: is a directory; give a .jsonl, .json or .parquet file")
            if path.endswith(".parquet"):
                import datasets

                try:
                    ds = datasets.load_dataset("parquet", data_files=path, split="train")
                except Exception as e:  # noqa: BLE001 - a damaged or non-parquet file
                    raise DataError(f"{path}: cannot read the parquet file: {' '.join(str(e).split())[:300]}") from None
                if max_rows is not None:
                    ds = ds.select(range(min(max_rows, len(ds))))
                rows = [dict(r) for r in ds]
            else:  # JSON lines (.jsonl and any other local file) or JSON (.json), read with the json module
                text = _read_text(path)
                rows, lines = (_read_json if path.endswith(".json") else _read_json_lines)(path, text)
                rows = _fill_columns(rows)
        else:
            import datasets

            try:
                ds = datasets.load_dataset(path, name, split=split)
            except Exception as e:  # network / unknown dataset
                raise DataError(f"could not load dataset {path!r} (config {name!r}, split {split!r}): {e}") from e
            if max_rows is not None:
                ds = ds.select(range(min(max_rows, len(ds))))
            rows = [dict(r) for r in ds]
    if max_rows is not None:
        rows = rows[:max_rows]
        lines = None if lines is None else lines[:max_rows]
    if not rows:
        raise DataError(f"{path if isinstance(path, str) else 'in-memory data'}: the dataset has no rows")
    return rows, lines


def load_raw_rows(path: Any, name: Optional[str] = None, split: str = "train", max_rows: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows as plain dicts from a hub name, a local file, or an in-memory list."""
    return _load_rows(path, name, split, max_rows)[0]


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def is_messages(value: Any) -> bool:
    """A conversational prompt: a non-empty list of ``{"role": ..., "content": ...}`` dicts (TRL style)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                             for m in value)


def check_text_value(value: Any, column: str, key: str, where: str, allow_messages: bool = False):
    """The one place that decides what a prompt / answer value may be.  -> (value, converted-from type name or None).

    Text passes; a number or a bool is converted to text (the caller warns once per column); a list of
    ``{role, content}`` messages passes where ``allow_messages`` (a conversational prompt); any other list or
    dict is rejected with a :class:`DataError` naming the row and the column."""
    if isinstance(value, str):
        return value, None
    if allow_messages and is_messages(value):
        return value, None
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return str(value), type(value).__name__
    raise DataError(f"{where}: column {column!r} ({key}) is a {type(value).__name__} ({str(value)[:60]}), "
                    "expected text" + (" or a list of {role, content} messages" if allow_messages else ""))


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


def prepare_rows(raw: Sequence[Dict[str, Any]], cfg: DataConfig, source: str = "data",
                 lines: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """Validate fields and format prompts (no tokenizer needed).  ``lines`` (the rows' line numbers in a
    JSON-lines file) makes errors read ``FILE:LINE``."""
    out = []
    converted: Dict[str, list] = {}  # column -> [rows converted, first place, type]

    def text(r, i, column, key, where, allow_messages=False):
        value, was = check_text_value(r[column], column, key, where, allow_messages)
        if was is not None:
            entry = converted.setdefault(column, [0, where, [], key])
            entry[0] += 1
            if was not in entry[2]:
                entry[2].append(was)
        return value

    for i, r in enumerate(raw):
        where = f"{source}:{lines[i]} (row {i})" if lines is not None else f"{source} row {i}"
        if cfg.prompt_field not in r or _is_missing(r[cfg.prompt_field]):
            raise DataError(f"{where}: missing prompt field {cfg.prompt_field!r} (data.prompt_field); columns: {sorted(r)}")
        row = dict(r)
        row[cfg.prompt_field] = text(r, i, cfg.prompt_field, "data.prompt_field", where, allow_messages=True)
        if cfg.answer_field:
            if cfg.answer_field not in r or _is_missing(r[cfg.answer_field]):
                raise DataError(f"{where}: missing answer field {cfg.answer_field!r} (data.answer_field); columns: {sorted(r)}")
            answer = text(r, i, cfg.answer_field, "data.answer_field", where)
            row[cfg.answer_field] = answer
            row["answer_text"] = answer
            row["answer"] = extract_answer(answer, cfg.answer_extraction)
            if row["answer"] is None or not str(row["answer"]).strip():  # nothing could ever match it
                how = "is empty" if not str(answer).strip() else f"has no gold answer under data.answer_extraction={cfg.answer_extraction!r}"
                raise DataError(f"{where}: answer field {cfg.answer_field!r} (data.answer_field) {how}")
        if is_messages(row[cfg.prompt_field]):  # a conversation: rendered by the chat template at tokenization
            row["prompt"] = [dict(m) for m in row[cfg.prompt_field]]
            out.append(row)
            continue
        try:
            row["prompt"] = cfg.template.format(prompt=row[cfg.prompt_field], **{k: v for k, v in row.items() if k != "prompt"})
        except KeyError as e:
            raise DataError(f"{where}: data.template uses {{{e.args[0]}}} which is not a column; columns: {sorted(r)}") from None
        out.append(row)
    for column, (n, first, was, key) in converted.items():
        logger.warning("data: column %r (%s) holds %s values in %d of %d rows (first: %s); converted them to text",
                       column, key, "/".join(was), n, len(raw), first)
    return out


def encode_prompt(tokenizer, text: Any, chat_template: bool = False, system_prompt: Optional[str] = None,
                  tools: Optional[List[Dict[str, Any]]] = None, where: str = "prompt") -> List[int]:
    """Prompt token ids: the tokenizer's chat template with a generation prompt, or plain text.  A list of
    ``{role, content}`` messages (a conversational prompt) always goes through the chat template (``tools``:
    JSON schemas passed as ``tools=``); a tokenizer without one is a :class:`DataError` naming ``where``."""
    messages = is_messages(text)
    if messages or chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: {'the prompt is a list of chat messages' if messages else 'data.chat_template is true'}"
                            f" but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
                            "use a chat model's tokenizer or give the prompt as text")
        msgs = [dict(m) for m in text] if messages else [{"role": "user", "content": text}]
        if system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        kw = {"tools": tools} if tools else {}
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = (system_prompt + "\n" if system_prompt else "") + text
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def tokenize_rows(rows: List[Dict[str, Any]], cfg: DataConfig, tokenizer) -> List[Dict[str, Any]]:
    """Add ``prompt_ids`` (chat template or plain text); drop over-long prompts.  Every kept row gets
    ``row_id`` = its position in the returned list: a stable id that travels into ``Batch.info`` (selectors
    key their per-prompt state by it; the prompt text may be rewritten during training)."""
    kept, too_long = [], []
    for i, r in enumerate(rows):
        ids = encode_prompt(tokenizer, r["prompt"], cfg.chat_template, cfg.system_prompt, where=f"data row {i}")
        if len(ids) > cfg.max_prompt_tokens:
            too_long.append(f"row {i} ({len(ids)} tokens)")
            continue
        r["prompt_ids"] = ids
        r["row_id"] = len(kept)
        kept.append(r)
    dropped = len(rows) - len(kept)
    if not kept:
        raise DataError(f"every prompt is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}")
    if dropped:
        import logging

        logging.getLogger("rlkit").warning("dropped %d prompts longer than data.max_prompt_tokens=%d: %s%s", dropped,
                                           cfg.max_prompt_tokens, ", ".join(too_long[:5]), ", ..." if dropped > 5 else "")
    return kept


def load_prompts(cfg: DataConfig, tokenizer=None, split: str = "train", rows: Any = None) -> List[Dict[str, Any]]:
    if split == "train":
        raw, lines = _load_rows(rows if rows is not None else cfg.path, cfg.name, cfg.split, cfg.max_rows)
        source = str(cfg.path) if rows is None else "in-memory data"
    else:
        path = rows if rows is not None else (cfg.eval_path or cfg.path)
        raw, lines = _load_rows(path, cfg.eval_name if cfg.eval_path else cfg.name, cfg.eval_split, cfg.eval_max_rows)
        source = str(path) if rows is None else "in-memory eval data"
    prepared = prepare_rows(raw, cfg, source, lines)
    return tokenize_rows(prepared, cfg, tokenizer) if tokenizer is not None else prepared
