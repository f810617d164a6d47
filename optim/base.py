"""The contract between an optimizer and the training loop.

An optimizer registers one `OptimizerSpec`: a pydantic options class (the `optim:` section of
the config) and a `build` function from named trainable parameters to a torch Optimizer. The
flags say what the loop and the validator must know about it before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field


class OptimizerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    options: type[OptimizerOptions]
    build: Callable[[Iterable[tuple[str, torch.nn.Parameter]], OptimizerOptions], torch.optim.Optimizer]
    full_parameter_only: bool = False  # refuses adapter parameters (GaLore family)
    supports_zero: bool = True  # False: refused under DeepSpeed ZeRO / FSDP
    double_backward: bool = False  # needs loss.backward(create_graph=True) on some steps


def wants_create_graph(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the next backward must build a graph of the gradients (AdaHessian's Hessian
    steps). Optimizers opt in by defining `wants_create_graph()`."""
    probe = getattr(optimizer, "wants_create_graph", None)
    return bool(probe()) if callable(probe) else False


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in OPTIMIZERS:
        raise ValueError(f"optimizer {spec.name!r} registered twice")
    OPTIMIZERS[spec.name] = spec
    return spec
