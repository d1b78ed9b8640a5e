"""Typed config: YAML recipes composed from dataclasses, with ``a.b.c=value`` overrides.

    cfg = load_config(["recipe=recipes/grpo_gsm8k.yaml", "trainer.lr=1e-6", "algorithm.advantage=tempo"])

* A recipe is YAML whose keys mirror :class:`RLConfig`.  ``profiles:`` holds named
  override sets (``profile=tiny`` applies ``profiles.tiny``), and ``inherit:``
  names a base recipe (path relative to the recipe) that is loaded first.
* Plugins are given as a name (``advantage: grpo``) or a mapping
  (``advantage: {name: grpo, scale_by_std: false}``).  Setting the same name again
  (``algorithm.advantage=grpo``) keeps the params; a different name
  (``algorithm.advantage=tempo``) starts from that plugin's defaults and logs a
  warning naming every dropped param (params are never carried to another plugin:
  ``eps_high`` of ``ppo_clip`` and of ``gspo`` differ by three orders of magnitude).
* Values are read by the field's declared type (``rlkit/overrides.py``): ``str`` and
  ``Literal`` fields keep the text YAML 1.1 would convert (``run_name=0123`` stays
  ``'0123'``, ``mixed_precision=no`` is ``'no'``, ``template=Q: {prompt}`` a string).
* ``imports:`` lists modules / ``.py`` files with user plugins, imported before
  validation; installed packages use the ``rlkit.plugins`` entry-point group.
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

from .errors import UserError
from .overrides import Scalar, TextLoader, import_user_modules, parse_override, unwrap, wants_text
from .registry import BY_HOOK, PluginError, suggest


class ConfigError(UserError, ValueError):
    kind = "config"


@dataclass
class PluginSpec:
    """A plugin chosen by name, with its params (validated against ``Plugin.Params``)."""
    name: str
    args: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # args as written (text kept)

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
    # weight-sync check on the mean |rollout - trainer| log-prob gap (docs/reliability.md has the measurements):
    # the run stops when gap > max(max_logprob_gap_error, logprob_gap_relative x the first step's gap)
    max_logprob_gap_warn: float = 1e-4     # warns above max(this, logprob_gap_relative / 2 x the first step's gap)
    max_logprob_gap_error: float = 1e-3    # absolute (fp32: a correct sync measures ~3e-7, one skipped sync 1e-3..0.2)
    logprob_gap_relative: Optional[float] = 10.0   # x the first step's gap (bf16/fp16 engines); null = absolute only
    # asynchronous rollouts (docs/async.md): 0 = in-line, today's path bit for bit; k >= 1 = rollout workers run
    # ahead and a batch is trained at most k weight versions after the one that generated it
    max_staleness: int = 0
    num_workers: int = 1                   # local rollout workers per trainer rank (k >= 1)
    worker_addresses: List[str] = field(default_factory=list)   # "host:port" per worker; empty = spawn local workers
    worker_device: str = "auto"            # the workers' torch device; auto = the trainer's


@dataclass
class RewardConfig:
    functions: List[Any] = field(default_factory=lambda: ["gsm8k_flexible"])   # names or "file.py:fn"
    weights: Optional[List[float]] = None
    timeout_s: float = 30.0
    strict: bool = False                   # stop on a reward exception / timeout instead of skipping
    accuracy_key: Optional[str] = None     # reward component logged as "accuracy" (default: first function)
    # where user reward functions run: "process" (worker processes, killed and replaced on timeout), "thread"
    # (in-process; a timeout abandons the thread but cannot stop it), "none" (called directly; no timeout)
    isolation: Literal["process", "thread", "none"] = "process"


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
    metric_names: Literal["both", "rlkit", "trl"] = "both"   # trl: TRL's GRPOTrainer names (docs/metrics.md)
    # experiment trackers through accelerate (rlkit/trackers.py): tensorboard, wandb, mlflow, trackio, comet_ml,
    # aim, clearml, dvclive, swanlab; [] = metrics.jsonl only (always written)
    log_with: List[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "rlkit"         # the project name for wandb / mlflow / ...; TensorBoard: RUN/<tracker_project>/
    wandb_mode: Literal["online", "offline"] = "online"   # offline: no login needed, `wandb sync RUN/wandb/...` later
    progress_bar: bool = True
    save_final: bool = True
    distributed_timeout_s: float = 300.0   # a rank silent this long (stopped, hung, dead) stops every rank, naming it


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
    imports: List[str] = field(default_factory=list)   # modules / .py files with user plugins, imported first


# ----------------------------------------------------------- type checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return unwrap(value)
    if isinstance(value, Scalar) and origin is not Union:  # str / Literal fields keep the text YAML would convert
        value = value.text if wants_text(tp) and value.value is not None else value.value
    if origin is Union:
        if unwrap(value) is None and type(None) in args:
            return None
        errors = []
        arms = list(args)
        if isinstance(value, Scalar):  # a structure first, then text, then other scalars
            arms.sort(key=lambda a: 0 if (typing.get_origin(a) in (list, List, dict, Dict) or a is PluginSpec
                                          or dataclasses.is_dataclass(a)) else 1 if wants_text(a) else 2)
        for a in arms:
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
        return unwrap(dict(value))
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
            raise ConfigError(f"{key}: a plugin mapping needs a 'name' key, got {unwrap(value)!r}")
        raw = {k: v for k, v in value.items() if k != "name"}
        return PluginSpec(str(unwrap(value["name"])), unwrap(raw), raw)
    raise ConfigError(f"{key}: expected a plugin name or {{name: ..., ...}}, got {value!r}")


def _text_field(tp) -> bool:
    """A ``str`` / ``Literal`` field, or an Optional of one (it takes an override's text, never its structure)."""
    if typing.get_origin(tp) is Union:
        return all(a is type(None) or wants_text(a) for a in typing.get_args(tp))
    return wants_text(tp)


RENAMED_KEYS = {"trainer.tensorboard": "trainer.log_with=[tensorboard] (a list of trackers; [] = none)",
                "trainer.wandb": "trainer.log_with=[wandb] (add tensorboard to keep it) and trainer.wandb_mode=online|offline",
                "trainer.wandb_project": "trainer.tracker_project"}


def build_dataclass(cls, values: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            if key in RENAMED_KEYS:  # keys of earlier releases
                raise ConfigError(f"{key} was replaced: use {RENAMED_KEYS[key]}")
            raise ConfigError(f"Unknown config key {key!r}." + suggest(k, names) + f" Valid keys here: {names}")
        f = fields[k]
        if isinstance(v, Scalar) and isinstance(v.value, (dict, list)) and not _text_field(hints[k]):
            v = v.value  # an override text that is a mapping or list, for a section / list / plugin field
        if f.metadata.get("hook") and isinstance(v, dict) and "name" not in v and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()  # params given without a name: keep the default plugin
            if isinstance(default, PluginSpec):
                v = {"name": default.name, **default.args, **v}
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - missing required field
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    except ConfigError:
        raise
    except (ValueError, AssertionError) as e:  # a plugin's own parameter check (Params.__post_init__)
        raise ConfigError(f"{_param_key(prefix or cls.__name__, e, kwargs)}: {e}") from None


def _param_key(prefix: str, err: BaseException, given: Dict[str, Any]) -> str:
    """``prefix.<param>`` when the message names exactly one of the given params, else ``prefix``."""
    import re

    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(err)))
    named = [k for k in given if k in words]
    return f"{prefix}.{named[0]}" if len(named) == 1 else prefix


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
        if isinstance(nxt, Scalar) and isinstance(nxt.value, dict):
            nxt = nxt.value
            node[p] = nxt
        if isinstance(nxt, str):  # a plugin given by name gets a param: {name: ..., param: ...}
            nxt = {"name": nxt}
            node[p] = nxt
        elif not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    old = node.get(parts[-1])
    if isinstance(old, Scalar) and isinstance(old.value, dict):
        old = old.value
    new = value.value if isinstance(value, Scalar) and isinstance(value.value, dict) else value
    if isinstance(old, str) and isinstance(new, dict) and _plugin_hook(parts):
        old = {"name": old}  # params for a plugin given by name
    if isinstance(old, dict) and "name" not in old and _plugin_hook(parts):
        default = _plugin_default(parts)  # params set before the name: they belong to the default plugin
        old = {"name": default, **old} if default else old
    if isinstance(old, dict) and "name" in old and isinstance(new, (str, dict)) and _plugin_hook(parts):
        node[parts[-1]] = _rename_plugin(dotted, _plugin_hook(parts), old, new)
    elif isinstance(new, dict) and isinstance(old, dict):
        node[parts[-1]] = _deep_merge(old, new)  # a mapping updates a section
    else:
        node[parts[-1]] = value


def _plugin_hook(parts: List[str]) -> Optional[str]:
    """The hook of the single-plugin config field at ``parts`` (``["algorithm", "advantage"]``), else None."""
    cls = RLConfig
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        f = {f.name: f for f in dataclasses.fields(cls)}.get(p)
        if f is None:
            return None
        tp = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            hook = f.metadata.get("hook")
            return hook if hook and typing.get_origin(tp) not in (list, List) else None
        cls = tp
    return None


def _plugin_default(parts: List[str]) -> Optional[str]:
    """The default plugin name of the config field at ``parts`` (``grpo`` for ``algorithm.advantage``)."""
    cls = RLConfig
    for p in parts[:-1]:
        cls = typing.get_type_hints(cls).get(p)
        if not dataclasses.is_dataclass(cls):
            return None
    f = {f.name: f for f in dataclasses.fields(cls)}.get(parts[-1])
    if f is None or f.default_factory is dataclasses.MISSING:
        return None
    d = f.default_factory()
    return d.name if isinstance(d, PluginSpec) else None


def _rename_plugin(dotted: str, hook: str, old: Dict[str, Any], new: Any) -> Any:
    """A plugin field set again.  The same name (``algorithm.advantage=grpo`` over ``{name: grpo, scale_by_std:
    false}``) keeps the params, and a mapping with it updates them.  A different name starts from the new plugin's
    defaults: the old params are dropped with a warning naming each, never carried over, because a parameter means
    something per plugin (``eps_high: 0.28`` of ``ppo_clip`` is a clip range; ``gspo``'s is 4e-4)."""
    old_name = unwrap(old.get("name"))
    new_args = {k: v for k, v in new.items() if k != "name"} if isinstance(new, dict) else {}
    new_name = unwrap(new.get("name", old_name)) if isinstance(new, dict) else unwrap(new)
    if new_name == old_name:
        return _deep_merge(old, new) if isinstance(new, dict) else old
    dropped = {k: v for k, v in old.items() if k != "name" and k not in new_args}
    if dropped:
        import logging

        logging.getLogger("rlkit.config").warning(
            "%s: %s -> %s starts from %s's defaults; dropped %s's %s (give them again, e.g. %s.%s=..., to keep them)",
            dotted, old_name, new_name, new_name, old_name, ", ".join(f"{k}={unwrap(v)!r}" for k, v in dropped.items()),
            dotted, next(iter(dropped)))
    return new

def _deep_merge(base: Dict[str, Any], upd: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not ("name" in v and v.get("name") != out[k].get("name")):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeyLoader(TextLoader):  # plain scalars keep their text for str fields (rlkit/overrides.py)
    """SafeLoader that rejects a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports an unhashable key
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                  f"(first given on line {seen[key] + 1}); a key may appear once per mapping")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                          f"save the recipe as UTF-8") from None


def _read_yaml(path: str, _chain: tuple = ()) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"Recipe file not found: {path}" + (f" (inherited by {_chain[-1]})" if _chain else ""))
    real = os.path.realpath(path)
    if real in [os.path.realpath(c) for c in _chain]:
        raise ConfigError(f"{path}: inherit cycle: {' -> '.join([*_chain, path])}")
    text = _read_text(path)
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = path
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at top level")
    base = data.pop("inherit", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: inherit: expected the path of a base recipe (a string), got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        data = _deep_merge(_read_yaml(base_path, (*_chain, path)), data)
    return data


def _parse_value(text: str) -> Any:
    """An override's value; the text is kept for str / Literal fields (``run_name=0123``, ``mixed_precision=no``)."""
    return parse_override(text)


def load_config(argv: List[str] | None = None, base: Dict[str, Any] | None = None, validate: bool = True) -> RLConfig:
    """Build a validated :class:`RLConfig` from ``recipe=``, ``profile=`` and dotted overrides."""
    argv = list(argv or [])
    tree: Dict[str, Any] = copy.deepcopy(base) if base else {}
    recipe = None
    profiles: List[str] = []
    overrides = []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"Bad argument {a!r}: expected key=value (e.g. trainer.lr=1e-6 or recipe=recipes/x.yaml)."
                              + suggest(a, ["--help", "--print-config"]) + " Options: --help, --print-config")
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
    # user plugins register before profiles and overrides are applied (a renamed plugin's params are checked)
    if tree.get("imports") is not None:
        tree["imports"] = import_user_modules(tree.get("imports"), recipe)
    for i, (k, v) in enumerate(overrides):
        if k == "imports":
            overrides[i] = (k, import_user_modules(v, recipe))
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
    args = {k: spec.raw[k] if k in spec.raw and unwrap(spec.raw[k]) == v else v for k, v in spec.args.items()}
    params = build_dataclass(params_cls, args, key)  # the written text where unchanged: str params keep it
    for k, v in args.items():  # and the spec (config.yaml, --print-config) says what the plugin got
        if isinstance(v, Scalar) and isinstance(getattr(params, k, None), str):
            spec.args[k] = getattr(params, k)
    return params


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
            try:
                check(cfg, make_params(cls, spec, key), key)
            except ConfigError:
                raise
            except (ValueError, PluginError) as e:  # a plugin's own cross-check
                raise ConfigError(f"{key}: {e}") from None
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
    validate_ranges(cfg)
    from .rewarding import validate_reward_specs
    validate_reward_specs(cfg.reward)


# ------------------------------------------------------------ value ranges
def validate_ranges(cfg: RLConfig) -> None:
    """Every numeric range rlkit relies on, checked before anything loads; raises ConfigError naming the key.
    (Types are checked by :func:`build_dataclass`, plugin params by each plugin's ``Params``.)"""
    import math

    def finite(key, v):
        if v is None or not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v}")

    def check(key, v, ok, what):
        if isinstance(v, float):
            finite(key, v)
        if not ok(v):
            raise ConfigError(f"{key} must be {what}, got {v}")

    t, r, a, e, d = cfg.trainer, cfg.rollout, cfg.algorithm, cfg.eval, cfg.data
    check("trainer.lr", t.lr, lambda v: v > 0, "> 0")
    if a.critic.lr is not None:
        check("algorithm.critic.lr", a.critic.lr, lambda v: v > 0, "> 0")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"trainer.adam_betas must be two values [beta1, beta2], got {t.adam_betas}")
    for i, b in enumerate(t.adam_betas):
        check(f"trainer.adam_betas[{i}]", float(b), lambda v: 0 <= v < 1, "in [0, 1)")
    check("trainer.weight_decay", t.weight_decay, lambda v: v >= 0, ">= 0")
    check("trainer.max_grad_norm", t.max_grad_norm, lambda v: v >= 0, ">= 0 (0 = no clipping)")
    check("trainer.warmup_steps", t.warmup_steps, lambda v: v >= 0, ">= 0")
    check("trainer.keep_checkpoints", t.keep_checkpoints, lambda v: v >= 1, ">= 1")
    check("trainer.save_every", t.save_every, lambda v: v >= 0, ">= 0 (0 = only at the end)")
    check("trainer.total_steps", t.total_steps, lambda v: v >= 1, ">= 1")
    check("trainer.logprob_chunk_size", t.logprob_chunk_size, lambda v: v >= 1, ">= 1")
    check("trainer.distributed_timeout_s", t.distributed_timeout_s, lambda v: v > 0, "> 0")
    if t.samples_per_minibatch is not None:
        check("trainer.samples_per_minibatch", t.samples_per_minibatch, lambda v: v >= 1, ">= 1 or null")
    for key, temp in (("rollout.temperature", r.temperature), ("eval.temperature", e.temperature)):
        check(key, temp, lambda v: v >= 0, ">= 0 (0 = greedy decoding)")
    check("rollout.top_p", r.top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
    check("rollout.top_k", r.top_k, lambda v: v >= 0, ">= 0 (0 = off)")
    check("rollout.samples_per_generate_call", r.samples_per_generate_call, lambda v: v >= 1, ">= 1")
    check("rollout.max_logprob_gap_warn", r.max_logprob_gap_warn, lambda v: v >= 0, ">= 0")
    check("rollout.max_logprob_gap_error", r.max_logprob_gap_error, lambda v: v > 0, "> 0")
    if r.logprob_gap_relative is not None:
        check("rollout.logprob_gap_relative", r.logprob_gap_relative, lambda v: v > 1, "> 1 (or null = absolute only)")
    check("rollout.max_staleness", r.max_staleness, lambda v: v >= 0, ">= 0 (0 = in-line rollouts)")
    check("rollout.num_workers", r.num_workers, lambda v: v >= 1, ">= 1")
    if r.max_staleness >= 1 and cfg.model.lora.enabled:
        raise ConfigError(f"rollout.max_staleness={r.max_staleness}: model.lora.enabled is not supported with rollout "
                          "workers (they hold full weights); use max_staleness: 0 with LoRA")
    for i, addr in enumerate(r.worker_addresses):
        host, _, port = str(addr).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"rollout.worker_addresses[{i}] must be \"host:port\", got {addr!r}")
    check("data.max_prompt_tokens", d.max_prompt_tokens, lambda v: v >= 1, ">= 1")
    for key, v in (("data.max_rows", d.max_rows), ("data.eval_max_rows", d.eval_max_rows), ("eval.max_prompts", e.max_prompts),
                   ("eval.max_new_tokens", e.max_new_tokens)):
        if v is not None:
            check(key, v, lambda v: v >= 1, ">= 1 or null")
    check("eval.every_steps", e.every_steps, lambda v: v >= 0, ">= 0 (0 = only on demand)")
    check("eval.samples_per_prompt", e.samples_per_prompt, lambda v: v >= 1, ">= 1")
    check("algorithm.kl.coef", a.kl.coef, lambda v: v >= 0, ">= 0 (0 = off)")
    if a.tis_cap is not None:
        check("algorithm.tis_cap", a.tis_cap, lambda v: v > 0, "> 0 or null")
    check("reward.timeout_s", cfg.reward.timeout_s, lambda v: v > 0, "> 0")
    from .trackers import check_names

    check_names(t.log_with)  # accelerate's tracker names
    # engine_args only for an engine that takes them, and only options it knows
    from .registry import ROLLOUT_ENGINES

    engine = ROLLOUT_ENGINES.get(r.engine, "rollout.engine")
    check_args = getattr(engine, "check_engine_args", None)
    if check_args is None:
        if r.engine_args:
            raise ConfigError(f"rollout.engine_args: the {r.engine!r} engine takes no engine_args, got {sorted(r.engine_args)} "
                              f"(engine_args are for rollout.engine=vllm)")
    else:
        try:
            check_args(dict(r.engine_args))
        except (PluginError, ValueError) as err:
            raise ConfigError(str(err)) from None


def save_config(cfg: RLConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
