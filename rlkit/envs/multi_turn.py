"""``multi_turn``: a rollout is a loop of model turns and environment steps.

Per step: every prompt row starts ``samples_per_prompt`` episodes (one engine call, ``n`` =
samples_per_prompt); then, turn after turn, the contexts of all still-active episodes of the batch go
to the engine in ONE call with ``n=1`` (prefix continuation: prompt + everything so far as token ids).
A model turn ends at EOS, a stop string (the environment's, e.g. ``</tool_call>``, plus
``rollout.stop``) or ``rollout.max_new_tokens``.  The environment's observation is tokenized (through
the chat template for message observations) and appended with ``response_mask`` 0: a hole that is
context for later turns but never a loss, metric or log-prob-gap token.  The episode ends when the
environment says ``done``, after ``max_turns`` model turns, or when the token budget
``max_total_tokens`` (policy + observation tokens) is spent; an observation that would leave no room for
a further model turn is not appended, so every row ends with a policy token.

Rewards: the environment's per-turn rewards plus its final reward are the ``env_reward`` column
(score with the ``env_reward`` reward function, alone or next to others).  Reward functions receive
``completions`` as the conversation: ``[{"role": "assistant", "content": ...}, {"role": "tool", ...}, ...]``
(TRL's conversational convention); ``completion_text`` / built-in rewards read the last message.

Metrics: ``multi_turn/turns`` (mean model turns per episode), ``multi_turn/tool_calls``,
``multi_turn/tool_errors`` (per episode), ``multi_turn/policy_tokens`` / ``multi_turn/observation_tokens``
(per episode), ``multi_turn/turn{k}_reward`` (mean per-turn reward at turn k), ``multi_turn/final_reward``,
``multi_turn/end_{done,max_turns,budget}`` (fractions).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..batch import Batch
from ..plugins import RolloutContext, RolloutStrategy
from ..registry import ENVIRONMENTS, PluginError, register_rollout_strategy
from ..rollout.strategies import PROMPT_COLUMNS_EXCLUDED
from .base import Environment, StepResult
from .chat import has_chat_template, observation_text, template_renders_tools, tools_in_system_message

logger = logging.getLogger(__name__)


def resolve_environment(spec: str):
    """A registered environment name or ``"file.py:Class"`` / ``"package.module:Class"``."""
    if ":" in spec:
        path, _, name = spec.rpartition(":")
        if path.endswith(".py"):
            if not os.path.exists(path):
                raise PluginError(f"environment {spec!r}: file {path} not found (relative to {os.getcwd()})")
            s = importlib.util.spec_from_file_location("rlkit_user_env_" + os.path.basename(path)[:-3], path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(path)
        cls = getattr(mod, name, None)
        if cls is None:
            raise PluginError(f"environment {spec!r}: {path} has no {name!r}")
        return cls
    return ENVIRONMENTS.get(spec, "rollout.strategy.environment")


def build_environment(spec: str, args: Dict[str, Any], ctx) -> Environment:
    from ..config import build_dataclass

    cls = resolve_environment(spec)
    params_cls = getattr(cls, "Params", None)
    params = build_dataclass(params_cls, dict(args or {}), "rollout.strategy.env_args") \
        if params_cls is not None and dataclasses.is_dataclass(params_cls) else None
    return cls(params, ctx)


@dataclass
class _Episode:
    row: Dict[str, Any]
    group: int
    prompt_ids: List[int]
    state: Any
    ids: List[int] = field(default_factory=list)
    mask: List[float] = field(default_factory=list)
    lps: List[float] = field(default_factory=list)
    spans: List[Dict[str, Any]] = field(default_factory=list)
    messages: List[Dict[str, Any]] = field(default_factory=list)
    turn_rewards: List[float] = field(default_factory=list)
    final_reward: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = "stop"
    end: str = ""
    active: bool = True


@register_rollout_strategy("multi_turn")
class MultiTurn(RolloutStrategy):
    """Multi-turn episodes against an ``environment`` (see the module docstring)."""

    @dataclass
    class Params:
        environment: str = "tools"                  # registered name or "file.py:Class"
        env_args: Dict[str, Any] = field(default_factory=dict)   # the environment's Params
        max_turns: int = 4                          # model turns per episode
        max_total_tokens: int = 0                   # policy + observation tokens; 0 = max_turns x rollout.max_new_tokens

        def __post_init__(self):
            if self.max_turns < 1:
                raise ValueError(f"multi_turn: max_turns must be >= 1, got {self.max_turns}")
            if self.max_total_tokens < 0:
                raise ValueError(f"multi_turn: max_total_tokens must be >= 0, got {self.max_total_tokens}")

    @classmethod
    def check_config(cls, cfg, params, key):
        """Before any model is loaded: the environment resolves and its env_args fit its Params."""
        from ..config import build_dataclass

        env_cls = resolve_environment(params.environment)
        pc = getattr(env_cls, "Params", None)
        if pc is not None and dataclasses.is_dataclass(pc):
            build_dataclass(pc, dict(params.env_args or {}), f"{key}.env_args")

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        try:
            self.env = build_environment(self.params.environment, self.params.env_args, self.ctx)
        except PluginError as e:
            raise ValueError(str(e)) from None
        self._prompt_cache: Dict[Any, List[int]] = {}
        self._renders_tools: Optional[bool] = None        # does the chat template use tools=? (checked once)
        self.last_metrics: Dict[str, float] = {}

    # ------------------------------------------------------------ prompts
    def _prompt_ids(self, row, tok) -> List[int]:
        """The row's prompt ids, re-encoded with the tools' schemas through the chat template when the
        environment has tools and the prompt is a chat (messages, or ``data.chat_template``): as ``tools=``, or, for
        a template that ignores ``tools=`` (SmolLM2's), in the system message (:func:`.chat.tools_in_system_message`)."""
        schemas = getattr(self.env, "schemas", None)
        if not schemas or tok is None or not has_chat_template(tok):
            return list(row["prompt_ids"])
        from ..data import encode_prompt, is_messages

        chat = is_messages(row.get("prompt")) or bool(self.config_value("data", "chat_template", default=False))
        if not chat:
            return list(row["prompt_ids"])
        key = row.get("row_id", id(row))
        if key not in self._prompt_cache:
            system = self.config_value("data", "system_prompt")
            if self._renders_tools is None:
                self._renders_tools = template_renders_tools(tok)
                if not self._renders_tools:
                    logger.warning("the chat template of %s ignores tools=; the tools' JSON schemas go into the system "
                                   "message instead (Hermes format, rlkit.envs.chat.TOOLS_SYSTEM)",
                                   getattr(tok, "name_or_path", "the tokenizer"))
            if self._renders_tools:
                ids = encode_prompt(tok, row["prompt"], True, system, tools=schemas)
            else:
                ids = encode_prompt(tok, tools_in_system_message(row["prompt"], schemas, system), True)
            self._prompt_cache[key] = ids
        return self._prompt_cache[key]

    def _obs_ids(self, tok, obs, ended_with_eos: bool) -> tuple:
        if obs is None:
            return [], ""
        if isinstance(obs, dict):
            obs = [obs]
        if isinstance(obs, list):
            if has_chat_template(tok):
                text = observation_text(tok, obs, ended_with_eos)
            else:
                text = "".join(str(m.get("content", "")) for m in obs)
        else:
            text = str(obs)
            if has_chat_template(tok):
                text = observation_text(tok, [{"role": self.env.role, "content": text}], ended_with_eos)
        return list(tok(text, add_special_tokens=False)["input_ids"]), text

    # ------------------------------------------------------------ rollout
    def __call__(self, rows, rctx: RolloutContext) -> Batch:
        tok = rctx.tokenizer
        n = rctx.samples_per_prompt
        p = self.params
        per_turn = rctx.sampling.max_new_tokens
        budget = p.max_total_tokens or p.max_turns * per_turn
        eos_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        stop = list(dict.fromkeys(list(rctx.sampling.stop) + list(getattr(self.env, "stop", []))))
        groups = rctx.alloc_groups(len(rows))
        prompts = [self._prompt_ids(r, tok) for r in rows]
        eps: List[_Episode] = [
            _Episode(row=r, group=int(g), prompt_ids=pi, state=self.env.reset(dict(r)))
            for r, g, pi in zip(rows, groups, prompts) for _ in range(n)
        ]
        for turn in range(p.max_turns):
            active = [e for e in eps if e.active]
            if not active:
                break
            room = min(per_turn, min(budget - len(e.ids) for e in active))
            sp = dataclasses.replace(rctx.sampling, max_new_tokens=max(1, room), stop=stop,
                                     seed=None if rctx.sampling.seed is None else rctx.sampling.seed + 7919 * turn)
            if turn == 0:
                outs = rctx.engine.generate(prompts, n, sp)
                comps = [c for row in outs for c in row]
            else:
                outs = rctx.engine.generate([e.prompt_ids + e.ids for e in active], 1, sp)
                comps = [row[0] for row in outs]
            texts, turn_ids = [], []
            for e, c in zip(active, comps):
                ids = list(c.token_ids)[: budget - len(e.ids)]
                e.ids += ids
                e.mask += [1.0] * len(ids)
                e.lps += list(c.logprobs)[: len(ids)]
                text = tok.decode(ids, skip_special_tokens=True)
                e.spans.append({"role": "assistant", "text": text, "policy": True})
                e.messages.append({"role": "assistant", "content": text})
                e.finish_reason = c.finish_reason
                texts.append(text)
                turn_ids.append(ids)
            results = self._steps([e.state for e in active], texts)
            for e, ids, res in zip(active, turn_ids, results):
                e.turn_rewards.append(float(res.reward))
                e.tool_calls += res.tool_calls
                e.tool_errors += res.tool_errors
                if res.done:
                    e.active, e.end = False, "done"
                    continue
                if turn + 1 >= p.max_turns:
                    e.active, e.end = False, "max_turns"
                    continue
                obs_ids, obs_text = self._obs_ids(tok, res.observation, bool(ids) and ids[-1] in eos_ids)
                if len(e.ids) + len(obs_ids) >= budget:   # no room left for another model turn
                    e.active, e.end = False, "budget"
                    continue
                if obs_ids:
                    e.ids += obs_ids
                    e.mask += [0.0] * len(obs_ids)
                    e.lps += [0.0] * len(obs_ids)
                    role = self.env.role
                    if isinstance(res.observation, (dict, list)):
                        msgs = [res.observation] if isinstance(res.observation, dict) else res.observation
                        role = msgs[0].get("role", role) if msgs else role
                        e.messages += [dict(m) for m in msgs]
                    else:
                        e.messages.append({"role": role, "content": str(res.observation)})
                    e.spans.append({"role": role, "text": obs_text, "policy": False})
        for e in eps:
            if e.active:
                e.active, e.end = False, "max_turns"
            fr = self.env.final_reward(e.state)
            e.final_reward = float(fr) if fr is not None else 0.0
        batch = self._to_batch(eps, rctx.pad_id)
        self.last_metrics = self._score(batch, eps, rctx)
        return batch

    def _steps(self, states: List[Any], texts: List[str]) -> List[StepResult]:
        """``env.step`` for every active episode; in a thread pool when the environment allows it
        (``max_workers`` > 1: tool calls are subprocesses or I/O, e.g. the Python sandbox)."""
        workers = int(getattr(self.env, "max_workers", 1) or 1)
        if workers <= 1 or len(states) <= 1:
            return [self.env.step(s, t) for s, t in zip(states, texts)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(states))) as pool:
            return list(pool.map(self.env.step, states, texts))

    def _to_batch(self, eps: List[_Episode], pad_id: int) -> Batch:
        S = len(eps)
        T = max([len(e.ids) for e in eps] + [1])
        ids = torch.full((S, T), pad_id, dtype=torch.long)
        mask = torch.zeros((S, T))
        lps = torch.zeros((S, T))
        for i, e in enumerate(eps):
            L = len(e.ids)
            if L:
                ids[i, :L] = torch.tensor(e.ids)
                mask[i, :L] = torch.tensor(e.mask)
                lps[i, :L] = torch.tensor(e.lps) * mask[i, :L]
        info: Dict[str, List[Any]] = {}
        keys = [k for k in eps[0].row.keys() if k not in PROMPT_COLUMNS_EXCLUDED] if eps else []
        for e in eps:
            for k in keys:
                info.setdefault(k, []).append(e.row.get(k))
        info["completion"] = ["".join(s["text"] for s in e.spans) for e in eps]
        info["finish_reason"] = [e.finish_reason for e in eps]
        info["spans"] = [e.spans for e in eps]
        info["messages"] = [e.messages for e in eps]
        info["end_reason"] = [e.end for e in eps]
        info["turn_rewards"] = [e.turn_rewards for e in eps]
        info["env_reward"] = [sum(e.turn_rewards) + e.final_reward for e in eps]
        return Batch(prompt_ids=[e.prompt_ids for e in eps], response_ids=ids, response_mask=mask,
                     group_ids=torch.tensor([e.group for e in eps], dtype=torch.long), rollout_logprobs=lps,
                     truncated=torch.tensor([e.finish_reason == "length" and e.end != "done" for e in eps]),
                     info=info)

    def _score(self, batch: Batch, eps: List[_Episode], rctx: RolloutContext) -> Dict[str, float]:
        skip = ("prompt", "completion", "finish_reason", "spans", "messages")
        columns = {k: v for k, v in batch.info.items() if k not in skip}
        res = rctx.rewarder(prompts=batch.info.get("prompt", [""] * len(batch)), completions=batch.info["messages"],
                            completion_ids=[[t for t, m in zip(e.ids, e.mask) if m > 0] for e in eps],
                            columns=columns, group_ids=batch.group_ids.tolist())
        batch.rewards = res.rewards
        batch.reward_components = dict(res.components)
        m = dict(res.metrics)
        S = max(len(eps), 1)
        pol = batch.response_mask.sum().item()
        obs = (batch.response_lengths.sum() - batch.response_mask.sum()).item()
        m["multi_turn/turns"] = sum(len(e.turn_rewards) for e in eps) / S
        m["multi_turn/tool_calls"] = sum(e.tool_calls for e in eps) / S
        m["multi_turn/tool_errors"] = sum(e.tool_errors for e in eps) / S
        m["multi_turn/policy_tokens"] = pol / S
        m["multi_turn/observation_tokens"] = obs / S
        m["multi_turn/final_reward"] = sum(e.final_reward for e in eps) / S
        for k in range(max(len(e.turn_rewards) for e in eps) if eps else 0):
            vals = [e.turn_rewards[k] for e in eps if len(e.turn_rewards) > k]
            m[f"multi_turn/turn{k + 1}_reward"] = sum(vals) / len(vals)
        for end in ("done", "max_turns", "budget"):
            m[f"multi_turn/end_{end}"] = sum(e.end == end for e in eps) / S
        return m

    def metrics(self) -> Dict[str, float]:
        return self.last_metrics
