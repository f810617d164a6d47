"""Optimizer registry: the names users write in `optim.name`."""
from optim.base import OPTIMIZERS, OptimizerOptions, OptimizerSpec, register_optimizer, wants_create_graph
from optim import adamw, sgd  # noqa: F401  (register "adamw", "sgd")
from optim import adahessian, galore, natural_galore  # noqa: F401  (register their names)
from optim.adahessian import AdaHessian
from optim.galore import GaLoreAdamW
from optim.natural_galore import NaturalGaLore

__all__ = [
    "AdaHessian", "GaLoreAdamW", "NaturalGaLore",
    "OPTIMIZERS", "OptimizerOptions", "OptimizerSpec", "register_optimizer", "wants_create_graph",
]
