"""Optimizer registry: the names users write in `optim.name`."""
from optim.base import OPTIMIZERS, OptimizerOptions, OptimizerSpec, register_optimizer, wants_create_graph
from optim import adamw  # noqa: F401  (registers "adamw")

__all__ = ["OPTIMIZERS", "OptimizerOptions", "OptimizerSpec", "register_optimizer", "wants_create_graph"]
