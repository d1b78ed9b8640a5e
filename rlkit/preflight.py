"""Checks that need the file system or the model's config, but no weights.

The trainer runs :func:`preflight` after the data has loaded and before the tokenizer and the model: an
unwritable ``trainer.output_dir``, a ``trainer.resume`` value that names no directory, a
``data.max_prompt_tokens`` beyond the model's context, or a rollout engine that cannot start here (vLLM not
installed, a head size its CPU backend lacks) fail in seconds with one line, not after the model has loaded.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

from .config import ConfigError, RLConfig

log = logging.getLogger("rlkit")


def check_output_dir(path: str) -> None:
    key = "trainer.output_dir"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path!r}: cannot create the directory: {e.strerror or e}") from None
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: exists and is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".rlkit-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={path!r}: not writable: {e.strerror or e}") from None


def check_resume(value: str) -> None:
    if value in ("none", "auto"):
        return
    if not value:
        raise ConfigError("trainer.resume is empty: use none, auto or a checkpoint directory (runs/<name>/checkpoints/step_N)")
    if not os.path.exists(value):
        raise ConfigError(f"trainer.resume={value!r}: no such checkpoint directory (use none, auto or "
                          f"runs/<name>/checkpoints/step_N)")
    if not os.path.isdir(value):
        raise ConfigError(f"trainer.resume={value!r}: not a directory (use none, auto or a checkpoint directory)")


def model_config(cfg: RLConfig):
    """The model's ``transformers`` config (a small JSON read; no weights), or None if it cannot be read here
    (the model loader then reports the problem with its own message)."""
    from transformers import AutoConfig

    from .toy import resolve

    try:
        return AutoConfig.from_pretrained(resolve(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # a hub id without network, a custom architecture, ...
        log.debug("preflight: cannot read the model config of %s: %s", cfg.model.name_or_path, e)
        return None


def context_length(mcfg) -> Optional[int]:
    if mcfg is None:
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(mcfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(cfg: RLConfig, mcfg) -> None:
    ctx = context_length(mcfg)
    if ctx is None:
        return
    d, r = cfg.data, cfg.rollout
    if d.max_prompt_tokens > ctx:
        raise ConfigError(f"data.max_prompt_tokens={d.max_prompt_tokens} is beyond the context of {cfg.model.name_or_path} "
                          f"({ctx} tokens, max_position_embeddings): lower it to at most {ctx}")
    if d.max_prompt_tokens + r.max_new_tokens > ctx:
        log.warning("data.max_prompt_tokens=%d + rollout.max_new_tokens=%d exceeds the context of %s (%d tokens): the "
                    "longest prompts cannot get a full-length response", d.max_prompt_tokens, r.max_new_tokens,
                    cfg.model.name_or_path, ctx)


def preflight(cfg: RLConfig, is_main: bool = True):
    """Run every pre-model check; returns the model config (or None)."""
    t = cfg.trainer
    check_output_dir(t.output_dir)
    check_resume(t.resume)
    from .trackers import check_available

    check_available(cfg)  # trainer.log_with installed; wandb online has a login
    mcfg = model_config(cfg)
    check_context(cfg, mcfg)
    from .registry import ROLLOUT_ENGINES

    engine = ROLLOUT_ENGINES.get(cfg.rollout.engine, "rollout.engine")
    pre = getattr(engine, "preflight", None)
    if pre is not None:
        pre(cfg, mcfg)
    return mcfg
