"""OPD: on-policy distillation from a separate teacher (regularizer ``opd``).

Method: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(GKD, ICLR 2024, arXiv 2306.13649), Eq. (1) with lambda = 1 (every sequence sampled by the student) -- the
"on-policy distillation with a separate teacher" that OPSD (Zhao et al., arXiv 2601.18734; spec B Sec. 4,
:mod:`rlkit.algorithms.opsd`) is compared with.  The student samples ``y ~ p(.|x)``; a separate, frozen,
possibly larger teacher model reads the *same* prompt followed by the student's tokens; at every response
position the student is pulled to the teacher's next-token distribution with the same generalised JSD as
OPSD (``D_beta``; beta = 0 forward KL(q || s), 1 reverse KL, TRL GKD convention), full vocabulary, top-k or
sampled-token.  The loss, chunking, alignment and metrics are OPSD's (this class only changes the teacher and
the defaults); the metrics are named ``opd/*``.

The teacher (``teacher_path``, required): any directory, hub id or ``toy:`` name whose tokenizer maps every
token to the same id as the student's.  Its hidden size, depth and parameter count may differ (the divergence
uses each model's own LM head on its own hidden states).  Checked when the config loads, before any model
(local directories and ``toy:`` names; a hub id when its weights load): a teacher whose vocabulary differs
fails with one line naming ``algorithm.regularizers[i].teacher_path``.
Output widths that differ only by padding rows beyond the tokenizer are cut to the common width.

Defaults that differ from OPSD:

* ``teacher_template: null``: the teacher reads the student's own prompt ids (no privileged context); a
  template string works as in OPSD (e.g. to give the teacher the solution as well).
* ``clip: null``.  OPSD's point-wise cap (Mar-18 release, 0.05) clamps each vocabulary element
  ``q_v (log q_v - log s_v)`` at tau_c with zero gradient above it, as the official code does
  (``jsd.clamp(max=token_clip)`` before the vocabulary sum).  It was tuned for self-distillation, where the
  teacher is the student's own weights and few elements exceed it.  With a distant teacher the elements of
  the teacher's likely tokens are the ones above the cap, so the cap removes exactly the pull towards the
  teacher, while the uncapped elements still push the student's mass on those tokens down (the gradient of
  a capped sum w.r.t. a capped token's logit is ``s_j * sum_{v uncapped} q_v`` > 0): the divergence then
  rises (docs/methods/opd.md; ``tests/test_opd.py::test_clip_with_a_distant_teacher_raises_the_divergence``).
* ``teacher`` is always the fixed model at ``teacher_path`` (no EMA / current weights: those are OPSD's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError
from ..registry import register_regularizer
from .opsd import OPSD

__all__ = ["OPD", "check_teacher_vocabulary", "regularizer_key"]


def _local(path: Optional[str]) -> bool:
    return bool(path) and (path.startswith("toy:") or os.path.isdir(path))


def regularizer_key(cfg, name: str, teacher_path: str) -> str:
    """``algorithm.regularizers[i].teacher_path`` of the regularizer ``name`` with this teacher."""
    for i, spec in enumerate(getattr(getattr(cfg, "algorithm", None), "regularizers", None) or []):
        if getattr(spec, "name", None) == name and (getattr(spec, "args", None) or {}).get("teacher_path") == teacher_path:
            return f"algorithm.regularizers[{i}].teacher_path"
    return f"{name}.teacher_path"


def check_teacher_vocabulary(cfg, teacher_path: str, key: str, offline: bool = True) -> None:
    """Raise one-line ConfigError unless the teacher's tokenizer maps every token to the student's id.
    Loads the two tokenizers and configs only (no weights).  ``offline``: only when both are local
    (directories or ``toy:`` names), so a config loads without the network; a hub teacher is checked
    again when its weights load (:meth:`OPSD._load_initial`)."""
    from transformers import AutoConfig

    from ..modeling import load_tokenizer
    from ..toy import resolve

    m = cfg.model
    student = m.tokenizer or m.name_or_path
    if offline and not (_local(teacher_path) and _local(student) and _local(m.name_or_path)):
        return
    try:
        t_tok = load_tokenizer(teacher_path, m.trust_remote_code)
        t_cfg = AutoConfig.from_pretrained(resolve(teacher_path), trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={teacher_path!r}: cannot load the teacher's tokenizer/config: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        s_tok = load_tokenizer(student, m.trust_remote_code)
        s_cfg = AutoConfig.from_pretrained(resolve(m.name_or_path), trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError):
        return  # the student's own loading reports its error, naming its key
    sv, tv = s_tok.get_vocab(), t_tok.get_vocab()
    if sv != tv:
        diff = sum(1 for t, i in sv.items() if tv.get(t) != i) + sum(1 for t in tv if t not in sv)
        raise ConfigError(f"{key}={teacher_path!r}: the teacher's vocabulary differs from the student's ({student!r}): "
                          f"{len(tv)} vs {len(sv)} tokens, {diff} missing or with another id; distillation compares "
                          f"next-token distributions id by id, so the teacher must use the student's tokenizer")
    n = len(sv)
    vs, vt = getattr(s_cfg, "vocab_size", None), getattr(t_cfg, "vocab_size", None)
    if vs is not None and vt is not None and vs != vt and min(vs, vt) < n:
        raise ConfigError(f"{key}={teacher_path!r}: the teacher has {vt} output rows and the student {vs}, but the "
                          f"tokenizer has {n} tokens; only padding rows beyond the tokenizer may differ")


@register_regularizer("opd")
class OPD(OPSD):
    """On-policy distillation from a separate teacher model (see the module docstring)."""

    name = "opd"
    prefix = "opd"

    @dataclass
    class Params(OPSD.Params):
        teacher_path: Optional[str] = None          # required: a directory, hub id or toy: name (same tokenizer)
        teacher_template: Optional[str] = None      # null: the student's own prompt ids
        clip: Optional[float] = None                # off (see the module docstring)
        teacher: Literal["initial"] = "initial"     # the fixed model at teacher_path

        def __post_init__(self):
            super().__post_init__()
            if not self.teacher_path:
                raise ValueError("opd: teacher_path is required (a directory, hub id or toy: name sharing the "
                                 "student's tokenizer); for a teacher that is the student itself use opsd")

    @staticmethod
    def check_config(cfg, params, key: str) -> None:
        check_teacher_vocabulary(cfg, params.teacher_path, f"{key}.teacher_path")
