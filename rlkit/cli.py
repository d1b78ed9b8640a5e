"""Entry point shared by ``launch/train.py`` and ``python -m rlkit train``."""
from __future__ import annotations

import logging
import sys
from typing import List, Optional


def train_main(argv: Optional[List[str]] = None):
    """Every user error (config, recipe, data, reward, checkpoint, output dir, vLLM set-up, a stalled rank) ends
    as one line ``<kind> error: ...`` on stderr, printed once per launch, and a non-zero exit (rlkit/errors.py)."""
    from .errors import run_cli

    return run_cli(_train_main, argv)


def _train_main(argv: Optional[List[str]] = None):
    from .config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        from .clihelp import TRAIN_USAGE

        print(TRAIN_USAGE)
        return None
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    cfg = load_config(argv)  # every key, type, range and plugin name is checked here, before torch loads a model
    if print_config:  # the fully resolved config, exactly what config.yaml of the run would hold
        import yaml

        from .config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None
    from .tracking import quiet_library_bars, use_progress_bar

    if not use_progress_bar(cfg.trainer.progress_bar):  # a log file: plain lines only, no library tqdm frames
        quiet_library_bars()
    from .trainer import Trainer

    from .checkpoint import CheckpointError

    try:
        trainer = Trainer(cfg)
    except CheckpointError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
    try:
        metrics = trainer.train()
    except CheckpointError as e:  # a checkpoint that cannot be written (disk full, non-finite weights)
        raise SystemExit(f"checkpoint error: {e}") from None
    if trainer.acc.is_main_process:
        from .report import ascii_curve, read_metrics, write_report

        rows = read_metrics(trainer.run_dir)
        print(ascii_curve([r.get("reward/mean") for r in rows]))
        out = write_report([trainer.run_dir], f"{trainer.run_dir}/report")
        print(f"run directory: {trainer.run_dir}  (report: {out['html']}, {len(out['plots'])} plots; "
              f"metrics.jsonl, completions.jsonl, config.yaml)")
    return trainer, metrics
