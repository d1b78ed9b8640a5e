"""Prompt data loading and evaluation metrics."""
import json
import subprocess
import sys

import pytest

from rlkit.config import DataConfig, EvalConfig
from rlkit.data import DataError, load_prompts, prepare_rows
from rlkit.evaluation import evaluate_rows, pass_at_k
from rlkit.rollout.base import Completion
from tests.conftest import REPO, shared_path


def test_local_formats_and_memory(tmp_path):
    rows = [{"question": "What is 2+2?", "answer": "so 4\n#### 4"}, {"question": "3+5?", "answer": "#### 1,008"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    cfg = DataConfig(answer_extraction="gsm8k", template="Q: {prompt}\nA:")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        cfg.path = str(tmp_path / name)
        out = load_prompts(cfg)
        assert [r["answer"] for r in out] == ["4", "1008"]
        assert out[0]["prompt"] == "Q: What is 2+2?\nA:" and out[0]["answer_text"] == "so 4\n#### 4"
    assert load_prompts(cfg, rows=rows)[1]["answer"] == "1008"


def test_boxed_extraction_and_template_columns():
    cfg = DataConfig(prompt_field="problem", answer_field="solution", answer_extraction="boxed",
                     template="[{level}] {prompt}")
    out = prepare_rows([{"problem": "p", "solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}", "level": "L5"}], cfg)
    assert out[0]["answer"] == "\\frac{1}{2}" and out[0]["prompt"] == "[L5] p"


def test_errors_name_row_and_field(tmp_path):
    cfg = DataConfig(prompt_field="question")
    with pytest.raises(DataError, match=r"row 1: missing prompt field 'question'"):
        prepare_rows([{"question": "a", "answer": "1"}, {"q": "b", "answer": "2"}], cfg)
    with pytest.raises(DataError, match=r"uses \{nope\}"):
        prepare_rows([{"question": "a", "answer": "1"}], DataConfig(template="{nope}"))
    with pytest.raises(DataError, match="data file not found"):
        load_prompts(DataConfig(path=str(tmp_path / "missing.jsonl")))


def test_tokenize_chat_template_and_overlong(toy_model_dir):
    from rlkit.modeling import load_tokenizer

    tok = load_tokenizer(toy_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=a:{% endif %}"
    rows = [{"question": "abc", "answer": "c"}, {"question": "x" * 100, "answer": "x"}]
    cfg = DataConfig(chat_template=True, max_prompt_tokens=40)
    out = load_prompts(cfg, tok, rows=rows)
    assert len(out) == 1  # the 100-character prompt is dropped
    assert tok.decode(out[0]["prompt_ids"]) == "u:abc=a:"


def test_pass_at_k_unbiased():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)       # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)       # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0


class FakeEngine:
    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompt_ids, n, sampling):
        return [[Completion([1] * len(t), [0.0] * len(t), "stop", t) for t in self.texts[i][:n]] for i in range(len(prompt_ids))]


def test_evaluate_strict_flexible_majority():
    rows = [{"prompt_ids": [1], "answer": "42"}, {"prompt_ids": [1], "answer": "7"}]
    texts = [["so #### 42", "it is 42", "#### 41", "#### 41"], ["#### 7", "#### 8", "7", "nothing"]]
    res = evaluate_rows(FakeEngine(texts), rows, EvalConfig(samples_per_prompt=4, temperature=1.0, checker="gsm8k"), 8)
    assert res["strict/pass@1"] == pytest.approx((1 / 4 + 1 / 4) / 2)
    assert res["flexible/pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert res["format_rate"] == pytest.approx(5 / 8)
    # strict maj@4: prompt 1 votes 41 (2) over 42 (1) -> wrong; prompt 2: 7 vs 8 tie, first seen (7) -> right
    assert res["strict/maj@4"] == pytest.approx(0.5)
    assert res["strict/pass@4"] == pytest.approx(1.0)


def test_eval_cli_writes_json(tmp_path, toy_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(toy_model_dir, model)
    p = subprocess.run([sys.executable, "-m", "rlkit", "eval", f"model={model}", f"recipe={REPO}/recipes/quickstart.yaml",
                        "eval.samples_per_prompt=2", "eval.max_prompts=4", "eval.temperature=0.7",
                        f"reward.functions=[{REPO}/rewards/toy.py:echo]", f"data.path={REPO}/recipes/data/echo_train.jsonl",
                        f"data.eval_path={REPO}/recipes/data/echo_test.jsonl", f"output_dir={tmp_path}/evals"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = (tmp_path / "evals").glob("data_echo_test__gsm8k_n2_t0.7_p4_*.json")   # never into the model folder
    assert not list(model.glob("eval*"))
    res = json.loads(path.read_text())["results"]
    assert res["num_prompts"] == 4 and res["samples_per_prompt"] == 2 and "flexible/pass@2" in res


def test_gsm8k_gold_answers_score_one_through_the_pipeline():
    path = shared_path("data", "gsm8k", "test.jsonl")
    rows = load_prompts(DataConfig(path=str(path), answer_extraction="gsm8k"))
    texts = [[f"Reasoning... #### {r['answer']}"] for r in rows]
    res = evaluate_rows(FakeEngine(texts), [dict(r, prompt_ids=[1]) for r in rows], EvalConfig(checker="gsm8k"), 8)
    assert res["num_prompts"] == 1319 and res["strict/pass@1"] == 1.0 and res["flexible/pass@1"] == 1.0


def test_math_checker_strict_and_flexible():
    rows = [{"prompt_ids": [1], "answer": "3\\pi"}]
    texts = [["so \\boxed{3\\pi}", "the answer is $3\\pi$", "\\boxed{3}"]]
    res = evaluate_rows(FakeEngine(texts), rows, EvalConfig(samples_per_prompt=3, temperature=1.0, checker="math"), 8)
    assert res["strict/pass@1"] == pytest.approx(1 / 3)      # only the boxed 3\pi counts as strict
    assert res["flexible/pass@1"] == pytest.approx(2 / 3)    # the unboxed 3\pi is found by math-verify's own extraction
    assert res["format_rate"] == pytest.approx(2 / 3)


def test_math500_gold_answers_score_one_through_the_pipeline():
    path = shared_path("data", "math500", "test.jsonl")
    rows = load_prompts(DataConfig(path=str(path), prompt_field="problem", answer_field="answer"))
    texts = [[f"Thus the answer is \\boxed{{{r['answer']}}}."] for r in rows]
    res = evaluate_rows(FakeEngine(texts), [dict(r, prompt_ids=[1]) for r in rows], EvalConfig(checker="math"), 8)
    assert res["num_prompts"] == 500 and res["strict/pass@1"] == 1.0
