"""Override and recipe values that keep their text, and user plugin imports.

YAML 1.1 resolves plain scalars by look: ``0123`` is the octal int 83, ``no``/``on`` are booleans and
``Q: {prompt}`` is a mapping.  For a ``str`` or ``Literal`` config field that silently changes the value, so the
value is read by the field's declared type instead (as Hydra's override grammar does):

* :class:`TextLoader` (recipe files) and :func:`parse_override` (``key=value``) return a :class:`Scalar` for every
  plain scalar that YAML would turn into a bool, int, float or null, and for a whole override text that YAML reads as
  a mapping or a list.  A ``Scalar`` carries both the original text and YAML's value.
* :func:`rlkit.config._coerce` then takes ``.text`` for ``str``/``Literal`` fields and ``.value`` for every other type
  (``trainer.run_name=0123`` -> ``'0123'``, ``trainer.lr=1e-6`` -> ``1e-06``, ``trainer.mixed_precision=no`` ->
  ``'no'``, ``data.template=Q: {prompt}`` -> ``'Q: {prompt}'``).  Quoting (``'0123'``) still forces a string.

``imports:`` (a recipe key, or ``imports=[...]``) names modules or ``.py`` files imported before validation so their
``@register_*`` decorators run; :func:`import_user_modules` does it and reports a bad entry in one line.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from typing import Any, List, Optional

import yaml


class Scalar:
    """A plain YAML scalar (or an override text) together with what YAML made of it."""
    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any):
        self.text = text
        self.value = value

    def __eq__(self, other):
        return unwrap(self) == unwrap(other)

    def __hash__(self):
        return hash(self.text)

    def __bool__(self):
        return bool(self.value)

    def __repr__(self):
        return repr(self.value) if not isinstance(self.value, (dict, list)) else repr(self.text)


def unwrap(v: Any) -> Any:
    """The plain Python value (YAML's reading) with every :class:`Scalar` removed."""
    if isinstance(v, Scalar):
        return unwrap(v.value)
    if isinstance(v, dict):
        return {unwrap(k): unwrap(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [unwrap(x) for x in v]
    return v


class TextLoader(yaml.SafeLoader):
    """SafeLoader whose plain bool/int/float/null scalars come back as :class:`Scalar` (mapping keys stay plain)."""

    def construct_mapping(self, node, deep=False):
        m = super().construct_mapping(node, deep=deep)
        return {unwrap(k): v for k, v in m.items()}


def _typed(base):
    def construct(loader, node):
        value = base(loader, node)
        if node.style is None:  # plain (unquoted): keep the text for str / Literal fields
            return Scalar(node.value, value)
        return value
    return construct


for _tag, _base in (("bool", yaml.SafeLoader.construct_yaml_bool), ("int", yaml.SafeLoader.construct_yaml_int),
                    ("float", yaml.SafeLoader.construct_yaml_float), ("null", yaml.SafeLoader.construct_yaml_null)):
    TextLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _typed(_base))


def load_yaml(stream) -> Any:
    """``yaml.safe_load`` that keeps plain scalars' text (see :class:`TextLoader`)."""
    return yaml.load(stream, Loader=TextLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> Any:
    """The value of a ``key=value`` override: YAML's reading, with the text kept where YAML would change it."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)):
        return Scalar(text, value)  # a str field takes the text ("Q: {prompt}"), a section or list the structure
    if value is None and not isinstance(value, Scalar):  # empty text
        return Scalar(text, None)
    return value


def wants_text(tp) -> bool:
    """Whether a config annotation is read as text (``str`` or a ``Literal`` of strings)."""
    import typing

    if tp is str:
        return True
    return typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(tp))


# ------------------------------------------------------------------ imports
_imported: dict = {}


def _import_file(path: str):
    path = os.path.abspath(path)
    if path in _imported:
        return _imported[path]
    stem = os.path.splitext(os.path.basename(path))[0]
    # the prefix rlkit.reward_pool.reference() knows: a reward registered here is re-loaded from this file in the
    # reward worker processes (spawned: they cannot import a module that only exists in this process)
    name = f"rlkit_user_reward_import_{re.sub(r'[^0-9A-Za-z_]', '_', stem)}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    mod = exec_file_as_module(name, path)
    _imported[path] = mod
    return mod


def exec_file_as_module(name: str, path: str):
    """Import the Python file ``path`` as module ``name`` (registered in ``sys.modules``, removed again if it fails)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"not a Python file: {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def import_user_modules(entries: Optional[List[Any]], recipe: Optional[str] = None, key: str = "imports") -> List[str]:
    """Import every entry of ``imports:`` (a dotted module name or a ``.py`` path; a relative path is tried from the
    working directory, then from the recipe's directory).  Raises ``ValueError`` naming the entry."""
    from .config import ConfigError

    if entries is None:
        return []
    entries = unwrap(entries)
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConfigError(f"{key}: expected a list of module names or .py files, got {entries!r}")
    mods = []
    for i, e in enumerate(entries):
        k = f"{key}[{i}]"
        if not isinstance(e, str) or not e.strip():
            raise ConfigError(f"{k}: expected a module name or a .py file, got {e!r}")
        e = e.strip()
        try:
            if e.endswith(".py") or os.sep in e or "/" in e:
                cands = [e] + ([os.path.join(os.path.dirname(os.path.abspath(recipe)), e)] if recipe and not os.path.isabs(e) else [])
                path = next((c for c in cands if os.path.isfile(c)), None)
                if path is None:
                    raise ConfigError(f"{k}: file not found: {e!r} (tried {', '.join(repr(c) for c in cands)})")
                _import_file(path)
                mods.append(os.path.abspath(path))
            else:
                importlib.import_module(e)
                mods.append(e)
        except ConfigError:
            raise
        except BaseException as ex:  # noqa: BLE001 - any failure of user code is a one-line config error
            if isinstance(ex, (KeyboardInterrupt, SystemExit)):
                raise
            where = ""
            if isinstance(ex, SyntaxError) and ex.lineno:
                where = f" (line {ex.lineno})"
            raise ConfigError(f"{k}: cannot import {e!r}: {type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}{where}") from None
    return mods
