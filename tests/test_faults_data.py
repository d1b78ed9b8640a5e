"""Fault suite, data files (issue 9, items 10 and 12): real bad files, each one line ``FILE:LINE: ...``.

Empty and blank files, a malformed JSON line, a non-UTF-8 byte, a line that is not an object, a missing
file, a directory, and values of the wrong type (converted with one warning per column, or rejected
naming the line and column).  One ``train_main`` call (what ``launch/train.py`` runs) checks the one-line
``data error:`` exit.
"""
import json
import logging

import pytest

from rlkit.config import DataConfig
from rlkit.data import DataError, check_text_value, load_prompts
from tests.conftest import tiny_overrides

GOOD = [{"question": "a?", "answer": "#### 1"}, {"question": "b?", "answer": "#### 2"}]


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _load(path, **kw):
    return load_prompts(DataConfig(path=path, answer_extraction="gsm8k", **kw))


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path, "empty.jsonl", content)
    with pytest.raises(DataError, match=rf"^{path}:1: the data file is empty"):
        _load(path)


def test_malformed_line_names_the_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", _jsonl(GOOD) + b'{"question": "c?", answer: "#### 3"}\n' + _jsonl(GOOD))
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON: Expecting property name .*\(column 20\)$"):
        _load(path)
    path = _write(tmp_path, "bad.json", b'[{"question": "a", "answer": "1"},\n {"question": "b" "answer": "2"}]')
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON"):
        _load(path)


def test_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path, "list.jsonl", _jsonl(GOOD) + b'["a?", "#### 3"]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: expected a JSON object per line, got a list$"):
        _load(path)


def test_non_utf8_byte_names_line_and_column(tmp_path):
    path = _write(tmp_path, "latin1.jsonl", _jsonl(GOOD) + '{"question": "caf\u00e9?", "answer": "#### 3"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(byte 0xe9 at column 18\)"):
        _load(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found \(relative to "):
        _load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory"):
        _load(str(tmp_path / "d.jsonl"))


def test_utf8_bom_blank_lines_and_uneven_columns_are_fine(tmp_path):
    data = b"\xef\xbb\xbf" + _jsonl(GOOD[:1]) + b"\n" + _jsonl([{**GOOD[1], "level": 3}])
    rows = _load(_write(tmp_path, "ok.jsonl", data))
    assert [r["answer"] for r in rows] == ["1", "2"]
    assert rows[0]["level"] is None and rows[1]["level"] == 3   # a missing column is None, as in a datasets table


def test_wrong_typed_scalars_are_converted_with_one_warning_per_column(tmp_path, caplog):
    rows = [{"question": "a?", "answer": 4}, {"question": 12, "answer": 2.5}, {"question": "c?", "answer": True},
            {"question": "d?", "answer": "7"}]
    path = _write(tmp_path, "typed.jsonl", _jsonl(rows))
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        out = load_prompts(DataConfig(path=path, answer_extraction="none"))
    assert [r["answer"] for r in out] == ["4", "2.5", "True", "7"]
    assert [r["question"] for r in out] == ["a?", "12", "c?", "d?"] and out[1]["prompt"].endswith("12")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    answer_w = next(w for w in warnings if "'answer'" in w)
    assert "int/float/bool values in 3 of 4 rows" in answer_w and f"{path}:1 (row 0)" in answer_w
    assert any("'question' (data.prompt_field) holds int values in 1 of 4 rows" in w for w in warnings)


@pytest.mark.parametrize("row,match", [
    ({"question": ["a", "b"], "answer": "1"}, r"column 'question' \(data\.prompt_field\) is a list"),
    ({"question": {"text": "a"}, "answer": "1"}, r"column 'question' \(data\.prompt_field\) is a dict"),
    ({"question": "a?", "answer": [1, 2]}, r"column 'answer' \(data\.answer_field\) is a list"),
    ({"question": "a?", "answer": {"value": 1}}, r"column 'answer' \(data\.answer_field\) is a dict"),
    ({"question": "a?", "answer": [{"role": "user", "content": "1"}]}, r"column 'answer' .* is a list"),
])
def test_lists_and_dicts_are_rejected_naming_line_and_column(tmp_path, row, match):
    path = _write(tmp_path, "typed.jsonl", _jsonl(GOOD + [row]))
    with pytest.raises(DataError, match=rf"^{path}:3 \(row 2\): " + match):
        _load(path)


def test_conversational_prompt_is_not_rejected():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    assert check_text_value(messages, "prompt", "data.prompt_field", "f:1", allow_messages=True) == (messages, None)
    out = load_prompts(DataConfig(prompt_field="prompt", answer_extraction="none"),
                       rows=[{"prompt": messages, "answer": "4"}])
    assert out[0]["answer"] == "4"
    with pytest.raises(DataError, match="in-memory data row 0: column 'prompt' .* is a list"):  # not messages
        load_prompts(DataConfig(prompt_field="prompt"), rows=[{"prompt": [{"role": "user"}], "answer": "4"}])


def test_cli_empty_data_file_is_one_line(tmp_path, capsys):
    """``launch/train.py`` is ``rlkit.cli.train_main()``; called in-process here (the subprocess path is exercised by
    tests/test_faults_rewards.py::test_cli_bad_reward_is_one_line_before_the_model_loads)."""
    from rlkit.cli import train_main

    path = _write(tmp_path, "empty.jsonl", b"")
    with pytest.raises(SystemExit) as e:
        train_main(tiny_overrides(tmp_path, **{"data.path": path}))
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"data error: {path}:1: the data file is empty (expected one JSON object per line)"]


@pytest.mark.parametrize("answer,extraction,match", [
    ("", "none", r"row 1\): answer field 'answer' \(data.answer_field\) is empty"),       # MATH train rows 5341, 5343
    (" #### ", "gsm8k", r"row 1\): .* no gold answer under data.answer_extraction='gsm8k'"),
    ("solved, no box", "boxed", r"row 1\): .* no gold answer under data.answer_extraction='boxed'"),
])
def test_answer_that_nothing_can_match_is_rejected(tmp_path, answer, extraction, match):
    rows = [{"question": "a?", "answer": "\\boxed{1} #### 1"}, {"question": "b?", "answer": answer}]
    p = _write(tmp_path, "d.jsonl", _jsonl(rows))
    with pytest.raises(DataError, match=match):
        load_prompts(DataConfig(path=p, answer_extraction=extraction))


def test_existing_file_of_another_type_is_named_not_sent_to_the_hub(tmp_path):
    p = _write(tmp_path, "notes.md", b"# not data\n")
    with pytest.raises(DataError, match=r"notes.md: unsupported data file type"):
        _load(p)
