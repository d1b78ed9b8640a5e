"""rlkit: reinforcement-learning post-training of LLMs with pluggable objectives."""
__version__ = "0.1.0"

from .batch import Batch  # noqa: F401
from .config import RLConfig, load_config  # noqa: F401
