"""Typed config: YAML recipes composed from dataclasses, with ``a.b.c=value`` overrides.

    cfg = load_config(["recipe=recipes/grpo_gsm8k.yaml", "trainer.lr=1e-6", "algorithm.advantage=tempo"])

* A recipe is YAML whose keys mirror :class:`RLConfig`.  ``profiles:`` holds named
  override sets (``profile=tiny`` applies ``profiles.tiny``), and ``inherit:``
  names a base recipe (path relative to the recipe) that is loaded first.
* Plugins are given as a name (``advantage: grpo``) or a mapping
  (``advantage: {name: grpo, scale_by_std: false}``).  Overriding the name
  (``algorithm.advantage=tempo``) resets that plugin's params.
* Every key is checked: an unknown key, a wrong type or an unknown plugin name
  raises :class:`ConfigError` naming the key and suggesting close matches,
  before anything heavy is imported or loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from .registry import BY_HOOK, PluginError, suggest


class ConfigError(ValueError):
    pass


@dataclass
class PluginSpec:
    """A plugin chosen by name, with its params (validated against ``Plugin.Params``)."""
    name: str
    args: Dict[str, Any] = field(default_factory=dict)

    def to_yaml(self):
        return {"name": self.name, **self.args} if self.args else self.name


def plugin(hook: str, default: Optional[str] = None, **kw):
    """A config field holding one plugin of ``hook``."""
    if default is None:
        return field(default=None, metadata={"hook": hook})
    return field(default_factory=lambda: PluginSpec(default, dict(kw)), metadata={"hook": hook})


def plugin_list(hook: str):
    return field(default_factory=list, metadata={"hook": hook})


# ----------------------------------------------------------------- sections
@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, List[str]] = "all-linear"


@dataclass
class ModelConfig:
    name_or_path: str = ""                 # HF hub id or local directory
    tokenizer: Optional[str] = None        # defaults to name_or_path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    path: str = ""                         # hub name, local .jsonl/.json/.parquet, or "" for in-memory rows
    name: Optional[str] = None             # hub config name (e.g. "main" for openai/gsm8k)
    split: str = "train"
    prompt_field: str = "question"
    answer_field: Optional[str] = "answer"
    answer_extraction: Literal["none", "gsm8k", "boxed"] = "none"
    template: str = "{prompt}"             # str.format over {prompt} and every dataset column
    system_prompt: Optional[str] = None
    chat_template: bool = False            # wrap in the tokenizer's chat template
    max_prompt_tokens: int = 512
    max_rows: Optional[int] = None
    eval_path: Optional[str] = None
    eval_name: Optional[str] = None
    eval_split: str = "test"
    eval_max_rows: Optional[int] = None


@dataclass
class RolloutConfig:
    engine: str = "hf"                     # registered rollout engine
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    samples_per_generate_call: int = 256   # how many completions one engine call generates at most
    strategy: Optional[PluginSpec] = plugin("rollout_strategy", "single")
    engine_args: Dict[str, Any] = field(default_factory=dict)   # backend-specific (vLLM memory split, ...)
    max_logprob_gap_warn: float = 0.05     # mean |rollout - trainer| log-prob gap that warns
    max_logprob_gap_error: float = 1.0     # ... and that stops the run (weight sync is broken)


@dataclass
class RewardConfig:
    functions: List[Any] = field(default_factory=lambda: ["gsm8k_flexible"])   # names or "file.py:fn"
    weights: Optional[List[float]] = None
    timeout_s: float = 30.0
    strict: bool = False                   # stop on a reward exception / timeout instead of skipping
    accuracy_key: Optional[str] = None     # reward component logged as "accuracy" (default: first function)


@dataclass
class KLConfig:
    coef: float = 0.0                      # 0 = off (no reference model is loaded)
    estimator: str = "k3"
    placement: Literal["loss", "reward"] = "loss"


@dataclass
class CriticConfig:
    value_loss_coef: float = 0.5
    cliprange_value: float = 0.5
    lr: Optional[float] = None             # defaults to trainer.lr


@dataclass
class AlgorithmConfig:
    advantage: Optional[PluginSpec] = plugin("advantage", "grpo")
    policy_loss: Optional[PluginSpec] = plugin("policy_loss", "ppo_clip")
    aggregation: Optional[PluginSpec] = plugin("aggregation", "seq_mean_token_mean")
    kl: KLConfig = field(default_factory=KLConfig)
    entropy_coef: float = 0.0
    regularizers: List[PluginSpec] = plugin_list("regularizer")
    filters: List[PluginSpec] = plugin_list("experience_filter")
    token_weighting: List[PluginSpec] = plugin_list("token_weighting")
    controllers: List[PluginSpec] = plugin_list("controller")
    prompt_selector: Optional[PluginSpec] = plugin("prompt_selector", "uniform")
    tis_cap: Optional[float] = None        # truncated importance sampling cap on rollout/trainer ratio
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class EvalConfig:
    every_steps: int = 0                   # 0 = only on demand
    samples_per_prompt: int = 1
    temperature: float = 0.0
    max_new_tokens: Optional[int] = None
    max_prompts: Optional[int] = 64
    checker: Literal["gsm8k", "math"] = "gsm8k"


@dataclass
class TrainerConfig:
    output_dir: str = "runs"
    run_name: Optional[str] = None
    total_steps: int = 100
    prompts_per_step: int = 8              # global, over all ranks
    samples_per_minibatch: Optional[int] = None   # global; None = the whole step is one mini-batch
    ppo_epochs: int = 1
    tokens_per_microbatch: int = 8192      # per rank, prompt + response tokens
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 42
    logprob_chunk_size: int = 1024         # positions per chunk when computing log-probs / entropy
    save_every: int = 0                    # 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "none"                   # none | auto | <checkpoint dir>
    log_completions: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlkit"
    progress_bar: bool = True
    save_final: bool = True


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: Optional[str] = None           # where this config came from (informational)


# ----------------------------------------------------------- type checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}." + suggest(value, [str(a) for a in args]))
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is PluginSpec:
        return _to_spec(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # yaml reads "1e-6" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _to_spec(value, key: str) -> PluginSpec:
    if isinstance(value, PluginSpec):
        return value
    if isinstance(value, str):
        return PluginSpec(value)
    if isinstance(value, dict):
        if "name" not in value:
            raise ConfigError(f"{key}: a plugin mapping needs a 'name' key, got {value!r}")
        args = {k: v for k, v in value.items() if k != "name"}
        return PluginSpec(str(value["name"]), args)
    raise ConfigError(f"{key}: expected a plugin name or {{name: ..., ...}}, got {value!r}")


def build_dataclass(cls, values: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"Unknown config key {key!r}." + suggest(k, names) + f" Valid keys here: {names}")
        f = fields[k]
        if f.metadata.get("hook") and isinstance(v, dict) and "name" not in v and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()  # params given without a name: keep the default plugin
            if isinstance(default, PluginSpec):
                v = {"name": default.name, **default.args, **v}
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - missing required field
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj) -> Any:
    if isinstance(obj, PluginSpec):
        return obj.to_yaml()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------- merging
def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str):  # a plugin given by name gets a param: {name: ..., param: ...}
            nxt = {"name": nxt}
            node[p] = nxt
        elif not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    old = node.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict):
        node[parts[-1]] = _deep_merge(old, value)  # a mapping updates a section (a new plugin name replaces it)
    else:
        # setting a plugin's name replaces the whole spec, so the old plugin's params are dropped
        node[parts[-1]] = value


def _deep_merge(base: Dict[str, Any], upd: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not ("name" in v and v.get("name") != out[k].get("name")):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"Recipe file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at top level")
    base = data.pop("inherit", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        data = _deep_merge(_read_yaml(base_path), data)
    return data


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(argv: List[str] | None = None, base: Dict[str, Any] | None = None, validate: bool = True) -> RLConfig:
    """Build a validated :class:`RLConfig` from ``recipe=``, ``profile=`` and dotted overrides."""
    argv = list(argv or [])
    tree: Dict[str, Any] = copy.deepcopy(base) if base else {}
    recipe = None
    profiles: List[str] = []
    overrides = []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"Bad argument {a!r}: expected key=value (e.g. trainer.lr=1e-6 or recipe=recipes/x.yaml)")
        k, v = a.split("=", 1)
        k = k.lstrip("-")
        if k == "recipe":
            recipe = v
        elif k == "profile":
            profiles += [p for p in v.split(",") if p]
        else:
            overrides.append((k, _parse_value(v)))
    if recipe:
        tree = _deep_merge(tree, _read_yaml(recipe))
        tree["recipe"] = recipe
    available = tree.pop("profiles", {}) or {}
    for p in profiles:
        if p not in available:
            raise ConfigError(f"Unknown profile {p!r} in {recipe}." + suggest(p, available) + f" Available: {sorted(available)}")
        for k, v in available[p].items():
            _set_dotted(tree, k, v)
    for k, v in overrides:
        _set_dotted(tree, k, v)
    cfg = build_dataclass(RLConfig, tree)
    if validate:
        validate_plugins(cfg)
    return cfg


# ------------------------------------------------------ plugin validation
def _iter_specs(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        hook = f.metadata.get("hook")
        if hook:
            if isinstance(v, list):
                for i, s in enumerate(v):
                    yield f"{key}[{i}]", hook, s
            elif v is not None:
                yield key, hook, v
        elif dataclasses.is_dataclass(v):
            yield from _iter_specs(v, key + ".")


def make_params(plugin_cls, spec: PluginSpec, key: str):
    params_cls = getattr(plugin_cls, "Params", None)
    if params_cls is None or not dataclasses.is_dataclass(params_cls):
        if spec.args:
            raise ConfigError(f"{key}: plugin {spec.name!r} takes no parameters, got {sorted(spec.args)}")
        return None
    return build_dataclass(params_cls, spec.args, key)


def validate_plugins(cfg: RLConfig) -> None:
    """Resolve every plugin name and its params; raise ConfigError naming the key."""
    from .registry import KL_ESTIMATORS, ROLLOUT_ENGINES

    for key, hook, spec in _iter_specs(cfg):
        try:
            cls = BY_HOOK[hook].get(spec.name, key)
        except PluginError as e:
            raise ConfigError(str(e)) from None
        make_params(cls, spec, key)
        check = getattr(cls, "check_config", None)
        if check is not None:
            check(cfg, make_params(cls, spec, key), key)
    for key, name, reg in (("algorithm.kl.estimator", cfg.algorithm.kl.estimator, KL_ESTIMATORS),
                           ("rollout.engine", cfg.rollout.engine, ROLLOUT_ENGINES)):
        try:
            reg.get(name, key)
        except PluginError as e:
            raise ConfigError(str(e)) from None
    t = cfg.trainer
    for key, val in (("trainer.prompts_per_step", t.prompts_per_step), ("rollout.samples_per_prompt", cfg.rollout.samples_per_prompt),
                     ("trainer.total_steps", t.total_steps), ("trainer.ppo_epochs", t.ppo_epochs),
                     ("trainer.tokens_per_microbatch", t.tokens_per_microbatch), ("rollout.max_new_tokens", cfg.rollout.max_new_tokens)):
        if val < 1:
            raise ConfigError(f"{key} must be >= 1, got {val}")
    if cfg.reward.weights is not None and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} entries but reward.functions has {len(cfg.reward.functions)}")
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is empty: set it in the recipe or with model.name_or_path=...")
    from .rewarding import validate_reward_specs
    validate_reward_specs(cfg.reward)


def save_config(cfg: RLConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
