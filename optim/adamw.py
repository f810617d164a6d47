"""AdamW with the usual split: no weight decay on biases and norm weights (1-D tensors)."""
from __future__ import annotations

import torch
from pydantic import Field

from optim.base import OptimizerOptions, OptimizerSpec, register_optimizer


class AdamWOptions(OptimizerOptions):
    name: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


def decay_groups(named_params, weight_decay: float) -> list[dict]:
    """Two param groups: matrices decay, vectors (biases, norms) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(named_params, opts: AdamWOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(named_params, opts.weight_decay), lr=opts.lr, betas=opts.betas, eps=opts.eps)


register_optimizer(OptimizerSpec("adamw", AdamWOptions, build_adamw))
