"""Built-in objective plugins: advantage estimators, policy losses,
aggregations, KL estimators, regularizers and experience filters.

Importing this package registers all of them.
"""
from . import aggregation, dapo, entropy, gae, grpo, gspo, kl, ppo_clip, reinforce_pp, rloo  # noqa: F401
from .aggregation import make_norm  # noqa: F401
from .gae import value_loss  # noqa: F401
from .kl import kl_loss_term  # noqa: F401
