"""AdaLoRA through peft, with its budget schedule driven from the loop's step hook.

peft's AdaLoRA only adapts if `update_and_allocate(step)` runs after every optimizer step while
the gradients are still there, and only adds its orthogonality penalty when the model computes
the loss itself. Our loop computes the loss, so the penalty is returned as an extra loss term.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from peft import AdaLoraConfig, get_peft_model
from pydantic import Field, model_validator

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.tasks import peft_task_type
from trainer.errors import UserError


class AdaLoraOptions(AdapterOptions):
    type: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="initial rank of every matrix")
    target_r: int = Field(8, ge=1, description="average rank after pruning")
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    tinit: int = Field(0, ge=0, description="steps of warm-up before pruning starts")
    tfinal: int = Field(0, ge=0, description="final steps with the budget fixed")
    delta_t: int = Field(1, ge=1, description="steps between budget reallocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _prunes(self) -> "AdaLoraOptions":
        if self.target_r >= self.init_r:  # peft would fail at its first pruning step
            raise ValueError(f"target_r ({self.target_r}) must be below init_r ({self.init_r}): AdaLoRA prunes ranks")
        return self


def orthogonality_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Mean over AdaLoRA's P and Q matrices of ||P P^T - I||_F (rows of A, columns of B)."""
    terms = []
    for name, p in model.named_parameters():
        if not p.requires_grad or p.numel() == 0:
            continue
        if "lora_A" in name:
            gram = p @ p.T
        elif "lora_B" in name:
            gram = p.T @ p
        else:
            continue
        terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype)))
    return torch.stack(terms).mean()


class AdaLoraHooks(MethodHooks):
    def __init__(self, opts: AdaLoraOptions):
        self.weight = opts.orth_reg_weight

    def extra_losses(self, batch, outputs, model):
        return {"reg/orth": self.weight * orthogonality_penalty(model)} if self.weight else {}

    def after_optimizer_step(self, step, model):
        _tuner(model).update_and_allocate(step)
        return []

    def metrics(self):
        return {}

    def state_dict(self):
        return {}


def _tuner(model):
    """The AdaLoraModel inside whatever wrappers (PeftModel, DDP) surround it."""
    model = getattr(model, "module", model)
    return model.base_model


def build_adalora(model, opts: AdaLoraOptions, ctx: BuildContext):
    if opts.tinit + opts.tfinal >= ctx.total_steps:
        raise UserError(f"tinit + tfinal ({opts.tinit} + {opts.tfinal}) leaves no steps for AdaLoRA to reallocate "
                        f"ranks in train.max_steps={ctx.total_steps}", where="adapter.tinit", hint="lower tinit/tfinal")
    cfg = AdaLoraConfig(
        init_r=opts.init_r, target_r=opts.target_r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
        target_modules=opts.target_modules, tinit=opts.tinit, tfinal=opts.tfinal, deltaT=opts.delta_t,
        beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.orth_reg_weight,
        total_step=ctx.total_steps, task_type=peft_task_type(ctx.task),
    )
    return get_peft_model(model, cfg), AdaLoraHooks(opts)


register_adapter(AdapterSpec("adalora", AdaLoraOptions, build_adalora))
