"""Experiment trackers through accelerate's integration (``trainer.log_with``).

rlkit writes ``metrics.jsonl`` / ``completions.jsonl`` itself (rlkit/tracking.py); everything else goes through
``Accelerator(log_with=..., project_config=ProjectConfiguration(...))``, ``accelerator.init_trackers`` and
``accelerator.log``, so every tracker accelerate supports works: tensorboard, wandb, mlflow, trackio, comet_ml,
aim, clearml, dvclive, swanlab.  What rlkit adds on top, and why:

* the names are checked when the config loads (accelerate silently drops an unknown or uninstalled tracker);
* wandb: ``trainer.wandb_mode`` (online | offline), a missing login in online mode is one config error before the
  model loads, and the wandb run id is kept in ``RUN/wandb_run_id`` so a resumed run continues the same wandb run
  (``id=..., resume="allow"``);
* the config is flattened to ``section.key`` scalars (TensorBoard's hparams and mlflow take no nested values).
"""
from __future__ import annotations

import json
import netrc
import os
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from .config import ConfigError

# the pip package that provides each tracker (accelerate's names)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
WANDB_ID_FILE = "wandb_run_id"
TABLE_ROWS = 64     # completions table rows logged to wandb per step (the full set is in completions.jsonl)


def known_trackers() -> List[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_names(names) -> None:
    """Unknown tracker names are a config error with close matches (called when the config loads)."""
    from .registry import suggest

    known = known_trackers()
    for n in names:
        if n not in known:
            raise ConfigError(f"trainer.log_with: unknown tracker {n!r}." + suggest(n, known) + f" Available: {known}")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def check_available(cfg) -> None:
    """Before the model loads: each tracker is installed, and wandb online has a login."""
    from accelerate.tracking import get_available_trackers

    t = cfg.trainer
    check_names(t.log_with)
    available = {str(x) for x in get_available_trackers()}
    for n in t.log_with:
        if n not in available:
            raise ConfigError(f"trainer.log_with: {n} is not installed here (pip install {PACKAGES.get(n, n)}, "
                              f"or remove {n} from trainer.log_with)")
    if "wandb" in t.log_with and t.wandb_mode == "online" and not _wandb_logged_in():
        raise ConfigError("trainer.wandb_mode=online: no wandb login (run `wandb login` or set WANDB_API_KEY), "
                          "or use trainer.wandb_mode=offline and `wandb sync` later")


def wandb_run_id(run_dir: str) -> str:
    """The run's wandb id, created once and kept in ``RUN/wandb_run_id``: a resumed run logs into the same run."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            rid = f.read().strip()
        if rid:
            return rid
    import secrets

    rid = secrets.token_hex(4)   # wandb ids: letters and digits
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(rid + "\n")
    return rid


def flat_config(d: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"trainer": {"lr": 1e-6}}`` -> ``{"trainer.lr": 1e-6}``; lists and None become text (hparams take scalars)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def tracker_project_config(output_dir: str):
    from accelerate.utils import ProjectConfiguration

    # logging_dir is the run directory once it is known (start()); output_dir until then
    return ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir)


def start(acc, cfg, run_dir: str, config_dict: Dict[str, Any]) -> None:
    """Start the trackers of ``trainer.log_with`` on ``acc`` (main process only; accelerate gates the rest).

    An accelerator passed to the Trainer keeps its own trackers: started ones are used as they are, and one built
    without ``log_with`` gets rlkit's (accelerate takes tracker objects in ``log_with``)."""
    t = cfg.trainer
    if acc.trackers or not acc.is_main_process:
        return
    pc = acc.project_configuration
    pc.set_directories(run_dir)
    pc.logging_dir = run_dir   # TensorBoard: RUN/<tracker_project>/; aim, mlflow, dvclive: under RUN/
    kwargs: Dict[str, Dict[str, Any]] = {"wandb": {"name": os.path.basename(run_dir), "dir": run_dir,
                                                   "mode": t.wandb_mode, "resume": "allow"}}
    if "wandb" in t.log_with:
        kwargs["wandb"]["id"] = wandb_run_id(run_dir)
    if not acc.log_with and t.log_with:  # an accelerator passed in without trackers
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        made = []
        for n in t.log_with:
            cls = LOGGER_TYPE_TO_CLASS[n]
            args = (t.tracker_project, run_dir) if cls.requires_logging_directory else (t.tracker_project,)
            made.append(cls(*args, **kwargs.get(n, {})))
        acc.log_with = made
    if acc.log_with:
        acc.init_trackers(t.tracker_project, config=flat_config(config_dict), init_kwargs=kwargs)


def log(acc, step: int, metrics: Dict[str, Any]) -> None:
    if acc is None or not acc.trackers:
        return
    import math

    acc.log({k: v for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}, step=step)


def log_completions_table(acc, step: int, rows: List[Dict[str, Any]], max_rows: int = TABLE_ROWS) -> None:
    """A bounded completions table (the first ``max_rows`` rows of the step) in wandb, when wandb is on."""
    wb = next((tr for tr in (acc.trackers if acc is not None else []) if tr.name == "wandb"), None)
    if wb is None or not rows:
        return
    rows = rows[:max_rows]
    columns = sorted({k for r in rows for k in r if not isinstance(r[k], (list, dict))})
    first = [c for c in ("prompt", "completion", "reward", "answer") if c in columns]
    columns = first + [c for c in columns if c not in first]
    wb.log_table("completions", columns=columns, data=[[r.get(c) for c in columns] for r in rows], step=step)


def finish(acc) -> None:
    """Close the trackers.  (Not ``accelerator.end_training()``: that also destroys the process group, and a
    Trainer is still used after ``train()`` returns: evaluate, save, a second ``train()``.)"""
    if acc is None:
        return
    for tr in acc.trackers:
        tr.finish()
    acc.trackers.clear()
