"""Name registries for every plugin hook.

Each hook (advantage, policy_loss, aggregation, ...) has one :class:`Registry`.
Plugins register under a name with a decorator::

    @register_advantage("grpo")
    class GRPO(AdvantageEstimator): ...

A recipe then picks them by name.  Looking up an unknown name raises a
:class:`PluginError` that lists the close matches, so a typo fails before any
model is loaded.  Built-in plugins live in modules listed in ``_BUILTIN_MODULES``
and are imported lazily on first lookup, so ``import rlkit`` stays cheap.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, List

_BUILTIN_MODULES = [
    "rlkit.objectives",      # advantages, losses, aggregation, kl, regularizers, filters, token weighting
    "rlkit.rollout",         # engines and rollout strategies
    "rlkit.selectors",       # prompt selectors
    "rlkit.rewarding",       # built-in reward names
    "rlkit.algorithms",      # research methods (TEMPO, SPO, D3S, EFRame, UEC, PCL, MM-UPT, OPSD, ...)
    "rlkit.tools",           # tools (python sandbox, calculator) and tool-call parsers
    "rlkit.envs",            # multi-turn environments and the multi_turn rollout strategy
]
_loaded = False


class PluginError(ValueError):
    """Unknown plugin name or bad plugin arguments (raised before compute)."""


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def load_builtins() -> None:
    """Import every module that registers built-in plugins (idempotent)."""
    global _loaded
    if _loaded:
        if _entry_point_error:
            raise PluginError(_entry_point_error)
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # an optional package that is not present
            if e.name != mod:
                raise
    load_entry_points()


_entry_points_loaded: set = set()
_entry_point_error = ""


def load_entry_points(group: str = "rlkit.plugins") -> None:
    """Import the plugins that installed packages declare under the ``rlkit.plugins`` entry-point group
    (``[project.entry-points."rlkit.plugins"] my_pkg = "my_pkg.plugins"``), so their ``@register_*`` decorators
    run.  A failing entry point raises a one-line :class:`PluginError` naming it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        ident = f"{ep.name} = {ep.value}"
        if ident in _entry_points_loaded:
            continue
        _entry_points_loaded.add(ident)
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - user code: report it in one line (again on every lookup)
            global _entry_point_error
            _entry_point_error = (f"entry point {group!r} {ident!r} failed to load: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
            raise PluginError(_entry_point_error) from None


class Registry:
    def __init__(self, hook: str, doc: str = ""):
        self.hook = hook
        self.doc = doc
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            prev = self._items.get(name)
            if prev is not None and prev is not obj and getattr(prev, "__qualname__", None) != getattr(obj, "__qualname__", None):
                raise PluginError(f"{self.hook} plugin {name!r} is already registered by {prev!r}")
            self._items[name] = obj
            try:
                obj.plugin_name = name
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def get(self, name: str, key: str | None = None):
        load_builtins()
        if name not in self._items:
            where = f" (config key {key})" if key else ""
            raise PluginError(
                f"Unknown {self.hook} plugin {name!r}{where}. Known: {sorted(self._items)}." + suggest(name, self._items)
            )
        return self._items[name]

    def names(self) -> List[str]:
        load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_builtins()
        return name in self._items


ADVANTAGES = Registry("advantage", "batch -> per-token advantages [S,T] (+ returns for a critic)")
POLICY_LOSSES = Registry("policy_loss", "LossInputs -> per-token loss [S,T] + metrics")
AGGREGATIONS = Registry("aggregation", "per-token loss, mask -> scalar")
KL_ESTIMATORS = Registry("kl", "logp, ref_logp -> per-token KL estimate")
REGULARIZERS = Registry("regularizer", "extra loss terms (entropy bonus, distillation)")
FILTERS = Registry("experience_filter", "drop / keep / re-weight samples or groups")
TOKEN_WEIGHTING = Registry("token_weighting", "per-token weights or masks")
PROMPT_SELECTORS = Registry("prompt_selector", "dataset -> prompts for this step")
ROLLOUT_STRATEGIES = Registry("rollout_strategy", "how many rounds, with which sampling settings")
ROLLOUT_ENGINES = Registry("rollout_engine", "generation backend (hf, vllm)")
REWARDS = Registry("reward", "reward functions (TRL keyword convention)")
CONTROLLERS = Registry("controller", "reads metrics after a step, adjusts hyperparameters")
REPLAY = Registry("replay", "buffers of past trajectories mixed into later batches")
ENVIRONMENTS = Registry("environment", "multi-turn environments: observation text / tool results between model turns")
TOOLS = Registry("tool", "plain Python functions the model may call (schema from signature + docstring)")
TOOL_PARSERS = Registry("tool_parser", "model output text -> tool calls")

ALL = [
    ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS, REGULARIZERS, FILTERS, TOKEN_WEIGHTING,
    PROMPT_SELECTORS, ROLLOUT_STRATEGIES, ROLLOUT_ENGINES, REWARDS, CONTROLLERS, REPLAY,
    ENVIRONMENTS, TOOLS, TOOL_PARSERS,
]
BY_HOOK = {r.hook: r for r in ALL}

register_advantage = ADVANTAGES.register
register_policy_loss = POLICY_LOSSES.register
register_aggregation = AGGREGATIONS.register
register_kl = KL_ESTIMATORS.register
register_regularizer = REGULARIZERS.register
register_filter = FILTERS.register
register_token_weighting = TOKEN_WEIGHTING.register
register_prompt_selector = PROMPT_SELECTORS.register
register_rollout_strategy = ROLLOUT_STRATEGIES.register
register_rollout_engine = ROLLOUT_ENGINES.register
register_reward = REWARDS.register
register_controller = CONTROLLERS.register
register_replay = REPLAY.register
register_environment = ENVIRONMENTS.register
register_tool = TOOLS.register
register_tool_parser = TOOL_PARSERS.register
