"""Environment for benchmark subprocesses that import rlkit from this checkout.

``rlkit.builtin_rewards`` is the top-level ``rewards/`` directory mapped by ``pyproject.toml``'s ``package-dir``; that
mapping exists only in a pip install.  With rlkit on ``PYTHONPATH`` instead (a device machine), or an editable install
that points at another checkout, ``import rlkit.builtin_rewards`` fails -- and the plugin registry imports it.
``rlkit_env`` returns an environment whose subprocesses (and their own children: rollout workers, reward workers)
import ``rlkit`` from this checkout and see ``rewards/`` as ``rlkit.builtin_rewards``, through a ``sitecustomize``
written to a temporary directory, only when the check below says it is needed.  Nothing is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parents[1]
_SHIM = '''\
import importlib.abc, importlib.util, os, sys

_DIR = os.environ.get("RLKIT_BUILTIN_REWARDS_DIR")


class _BuiltinRewards(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rlkit.builtin_rewards" and _DIR:
            return importlib.util.spec_from_file_location(name, os.path.join(_DIR, "__init__.py"),
                                                          submodule_search_locations=[_DIR])
        return None


sys.meta_path.insert(0, _BuiltinRewards())
'''
_CHECK = "import rlkit, rlkit.builtin_rewards, sys; sys.exit(0 if rlkit.__file__.startswith(sys.argv[1]) else 3)"


def rlkit_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    ok = subprocess.run([sys.executable, "-c", _CHECK, str(REPO)], env=env, cwd=str(REPO), capture_output=True).returncode == 0
    if not ok:
        shim = Path(tempfile.mkdtemp(prefix="rlkit_shim_"))
        (shim / "sitecustomize.py").write_text(_SHIM)
        env["PYTHONPATH"] = str(shim) + os.pathsep + env["PYTHONPATH"]
        env["RLKIT_BUILTIN_REWARDS_DIR"] = str(REPO / "rewards")
    return env
