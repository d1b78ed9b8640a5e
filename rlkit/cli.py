"""Entry point shared by ``launch/train.py`` and ``python -m rlkit train``."""
from __future__ import annotations

import logging
import sys
from typing import List, Optional


def train_main(argv: Optional[List[str]] = None):
    from .config import ConfigError, load_config
    from .data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(argv)  # every key, type and plugin name is checked here, before torch loads a model
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    metrics = trainer.train()
    if trainer.acc.is_main_process:
        from .report import ascii_curve, read_metrics, write_report

        rows = read_metrics(trainer.run_dir)
        print(ascii_curve([r.get("reward/mean") for r in rows]))
        out = write_report([trainer.run_dir], f"{trainer.run_dir}/report")
        print(f"run directory: {trainer.run_dir}  (report: {out['html']}, {len(out['plots'])} plots; "
              f"metrics.jsonl, completions.jsonl, config.yaml)")
    return trainer, metrics
