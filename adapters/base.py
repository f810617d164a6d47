"""The contract between an adapter method and the training loop.

A method registers one `AdapterSpec`: a pydantic options class (the `adapter:` section of the
config, validated strictly) and a `build` function that wraps the base model and returns the
`MethodHooks` the loop calls. The loop knows nothing else about any method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict


class NotMergeableError(NotImplementedError):
    """A method whose update is no weight delta (non-linear modules, cross-layer state): it stays
    attached as an adapter. A NotImplementedError, as peft's own unmergeable tuners raise."""


class AdapterOptions(BaseModel):
    """Base of every adapter's options; unknown keys are errors (see trainer.config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    type: str


class MethodHooks:
    """What a method may do inside the loop. Every hook has a do-nothing default."""

    def extra_losses(self, batch: dict, outputs: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Named scalar terms added to the task loss (already weighted) and logged by name."""
        return {}

    def after_optimizer_step(self, step: int, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Called after each optimizer step (step counts from 1), before gradients are zeroed,
        on the unwrapped model. Returns parameters the method
        created in this call; the loop adds them to the optimizer and to the LR schedule."""
        return []

    def metrics(self) -> dict[str, float]:
        """Extra values logged with the step metrics (e.g. adapter/total_rank)."""
        return {}

    def state_dict(self) -> dict:
        """Method state that must survive exact resume (rank allocations, EMAs, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; called after the model was rebuilt and before weights load."""


@dataclass(frozen=True)
class BuildContext:
    """What a method may need to know about the run when it wraps the model."""

    task: str  # "causal_lm" | "sequence_classification" | ...
    total_steps: int
    seed: int


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    options: type[AdapterOptions]
    build: Callable[[torch.nn.Module, AdapterOptions, BuildContext], tuple[torch.nn.Module, MethodHooks]]
    # "peft": saved and loaded through peft's save_pretrained; "full": the whole model is trained
    kind: str = "peft"
    # True when the method creates trainable parameters mid-run (rank growth): DDP's bucketed
    # gradient sync and ZeRO's partitioning are fixed at start-up, so it runs on one process
    adds_parameters: bool = False
    # why the method cannot train on weights partitioned across processes (DeepSpeed ZeRO-3, FSDP),
    # refused at launch; None = it can
    no_partitioned_weights: Optional[str] = None
    # the model.task values the method can train; None = every task
    tasks: Optional[tuple[str, ...]] = None
    # why the method cannot train with train.gradient_checkpointing (refused at config load); None = it can
    no_gradient_checkpointing: Optional[str] = None
    # custom final save (out_dir, peft_model, state_dict) for methods whose saved form differs
    # from the training form (PiSSA-style residual bases); None = peft's save_pretrained
    save_adapter: Optional[Callable[[torch.nn.Module, str, Optional[dict]], None]] = None


ADAPTERS: dict[str, AdapterSpec] = {}


def register_adapter(spec: AdapterSpec) -> AdapterSpec:
    if spec.name in ADAPTERS:
        raise ValueError(f"adapter {spec.name!r} registered twice")
    ADAPTERS[spec.name] = spec
    return spec
