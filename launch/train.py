"""Train with a recipe:

    accelerate launch launch/train.py recipe=recipes/grpo_gsm8k.yaml trainer.lr=1e-6
    accelerate launch --config_file launch/deepspeed_zero2.yaml launch/train.py recipe=...
    python launch/train.py recipe=recipes/quickstart.yaml          # one CPU process
    python launch/train.py recipe=recipes/grpo_math.yaml profile=tiny --print-config   # resolved config, no run
    python launch/train.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkit.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
