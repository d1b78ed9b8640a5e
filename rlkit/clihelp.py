"""Help texts of the command line and ``python -m rlkit plugins NAME`` (a plugin's parameters)."""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import textwrap
import typing
from typing import Any, Dict, List, Tuple

TRAIN_USAGE = """\
usage: python launch/train.py recipe=RECIPE.yaml [profile=NAME[,NAME]] [KEY=VALUE ...] [--print-config]
       python -m rlkit train ...            (the same; several processes: accelerate launch launch/train.py ...)

Train with a recipe.  Every argument is KEY=VALUE:
  recipe=PATH          a YAML recipe (keys mirror the config sections below; `inherit:` names a base recipe)
  profile=NAME         apply the recipe's `profiles.NAME` override set (e.g. profile=tiny: CPU-sized)
  SECTION.KEY=VALUE    any config key, e.g. trainer.lr=1e-6 rollout.samples_per_prompt=8 algorithm.advantage=rloo
                       algorithm.policy_loss.eps_high=0.28 reward.functions=[gsm8k_strict] trainer.run_name=0123
  imports=[mod, f.py]  modules or .py files with user plugins (@register_*), imported before validation
Values are read by the key's declared type: str keys keep their text (run_name=0123 stays '0123',
mixed_precision=no is 'no'); quote to force a string.  Sections: model, data, rollout, reward, algorithm,
trainer, eval.  Every key, type and plugin name is checked before a model loads.

options:
  -h, --help           this help
  --print-config       print the fully resolved config (YAML) and exit without training

See also: python -m rlkit plugins [NAME]   (plugins and their parameters); README.md; docs/."""

EVAL_USAGE = """\
usage: python -m rlkit eval model=DIR [recipe=RECIPE.yaml] [profile=NAME] [output_dir=DIR] [KEY=VALUE ...]

Evaluate a model directory or hub id (pass@1, unbiased pass@k, maj@k, strict and flexible extraction,
format rate) on data.eval_path (default: data.path).
  model=DIR            the model: a checkpoint's HF directory (runs/X/checkpoints/step_N/model) or a hub id
  recipe=PATH          the recipe it was trained with (prompt template, extraction, checker)
  output_dir=DIR       where the results go (also --output_dir DIR).  Default: RUN/eval/step_N/ when the model
                       is RUN/checkpoints/step_N/model, else <trainer.output_dir>/eval/<model name>/; never the
                       model folder
  data.eval_path=...   the data (a local .jsonl/.json/.parquet or a hub dataset); eval.samples_per_prompt=4,
                       eval.temperature=0.6, eval.max_prompts=null (all), eval.checker=gsm8k|math, ...
  trainer.progress_bar=false   no progress bar (one line per chunk; also when stderr is not a terminal)
Results: <output_dir>/<dataset>__<settings>_<hash>.json, one file per dataset and settings (the hash covers the
template, stop strings and every other setting), e.g.
  runs/grpo_math/eval/step_400/math500_test__math_n1_t0_all_len3000_<hash>.json

options:
  -h, --help           this help"""


def _type_str(tp) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _field_comments(cls) -> Dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment}, from the class source (when available)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: Dict[str, str] = {}
    for line in src.splitlines():
        m = re.match(r"\s*([A-Za-z_]\w*)\s*:[^#]*?#\s*(.*\S)\s*$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
    return out


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return repr(f.default_factory())  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            return "<factory>"
    return "(required)"


def params_table(params_cls) -> List[Tuple[str, str, str, str]]:
    """(name, type, default, doc) for every field of a ``Params`` dataclass."""
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception:  # noqa: BLE001
        hints = {}
    comments = _field_comments(params_cls)
    rows = []
    for f in dataclasses.fields(params_cls):
        doc = f.metadata.get("doc") or comments.get(f.name, "")
        rows.append((f.name, _type_str(hints.get(f.name, f.type)), _default(f), doc))
    return rows


def _first_doc(obj) -> str:
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    mod = sys.modules.get(getattr(obj, "__module__", ""), None)
    return inspect.cleandoc(own or getattr(mod, "__doc__", None) or "")


def describe_plugin(hook: str, name: str, obj: Any) -> str:
    """A plugin's help: where it lives, its docstring, and its parameters with types, defaults and docs."""
    target = getattr(obj, "target", None)
    if isinstance(target, str) and ":" in target:  # a built-in reward: a lazy reference to "module:function"
        import importlib

        mod, fn = target.split(":", 1)
        try:
            real = getattr(importlib.import_module(mod), fn)
            doc = _first_doc(obj)
            obj = real
        except Exception:  # noqa: BLE001 - an optional dependency that is missing: describe the reference
            doc = _first_doc(obj)
    else:
        doc = _first_doc(obj)
    where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
    lines = [f"{hook} plugin {name!r}  ({where})"]
    own = _first_doc(obj) if obj is not None else ""
    if own and own not in doc:
        doc = f"{doc}\n\n{own}" if doc else own
    if doc:
        lines += ["", textwrap.indent(doc, "  ")]
    params = getattr(obj, "Params", None) if isinstance(obj, type) else None
    lines.append("")
    if params is not None and dataclasses.is_dataclass(params):
        rows = params_table(params)
        if rows:
            lines.append(f"  parameters (in a recipe: {{name: {name}, <param>: <value>}}):")
            w0 = max(len(r[0]) for r in rows)
            w1 = max(len(r[1]) for r in rows)
            w2 = max(len(r[2]) for r in rows)
            for n, t, d, c in rows:
                lines.append(f"    {n:{w0}s}  {t:{w1}s}  default {d:{w2}s}  {c}".rstrip())
        else:
            lines.append("  parameters: none")
    elif callable(obj) and not isinstance(obj, type):  # a reward function: its keyword arguments
        try:
            lines.append(f"  signature: {name}{inspect.signature(obj)}")
        except (TypeError, ValueError):
            pass
    else:
        lines.append("  parameters: none")
    return "\n".join(lines)


def plugin_help(name: str) -> str:
    """Help for every plugin called ``name`` (a name may exist under several hooks), or the listing of a hook.
    Raises ``PluginError`` (one line, close matches) for an unknown name."""
    from .registry import ALL, BY_HOOK, PluginError, suggest

    if name in BY_HOOK:
        reg = BY_HOOK[name]
        return f"{reg.hook}: {reg.doc}\n" + "\n".join(f"  {n}" for n in reg.names())
    found = [describe_plugin(reg.hook, name, reg.get(name)) for reg in ALL if name in reg]
    if not found:
        every = sorted({n for reg in ALL for n in reg.names()} | set(BY_HOOK))
        raise PluginError(f"unknown plugin {name!r}." + suggest(name, every)
                          + " (python -m rlkit plugins lists every plugin)")
    return "\n\n".join(found)
