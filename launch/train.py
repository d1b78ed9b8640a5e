"""Train with a recipe:

    accelerate launch launch/train.py recipe=recipes/grpo_gsm8k.yaml trainer.lr=1e-6
    accelerate launch --config_file launch/deepspeed_zero2.yaml launch/train.py recipe=...
    python launch/train.py recipe=recipes/quickstart.yaml          # one CPU process
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlkit.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
