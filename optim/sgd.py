"""SGD with momentum (torch's), no weight decay on biases and norm weights. Ferret's local
optimizer in the paper: its update lies along the gradients, the few directions random bases
must capture, where Adam's per-coordinate steps spread it over all of them."""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from optim.adamw import decay_groups
from optim.base import OptimizerOptions, OptimizerSpec, register_optimizer


class SGDOptions(OptimizerOptions):
    name: str = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "SGDOptions":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


def build_sgd(named_params, opts: SGDOptions) -> torch.optim.Optimizer:
    return torch.optim.SGD(decay_groups(named_params, opts.weight_decay), lr=opts.lr, momentum=opts.momentum,
                           nesterov=opts.nesterov)


register_optimizer(OptimizerSpec("sgd", SGDOptions, build_sgd))
