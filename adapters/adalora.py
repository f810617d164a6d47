"""AdaLoRA through peft, with its budget schedule driven from the loop's step hook.

peft's AdaLoRA only adapts if `update_and_allocate(step)` runs after every optimizer step while
the gradients are still there, and only adds its orthogonality penalty when the model computes
the loss itself. Our loop computes the loss, so the penalty is returned as an extra loss term.
"""
from __future__ import annotations

from typing import Literal, Optional

from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from pydantic import Field, model_validator

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.orthogonality import orthogonality_penalty
from adapters.tasks import peft_task_type


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


class AdaLoraHooks(MethodHooks):
    def __init__(self, peft_model, opts: AdaLoraOptions):
        self.tuner = peft_model.base_model  # the AdaLoraModel: its rank allocator and config live there
        self.weight = opts.orth_reg_weight

    def extra_losses(self, batch, outputs, model):
        return {"reg/orth": self.weight * orthogonality_penalty(_factors(self.tuner))} if self.weight else {}

    def after_optimizer_step(self, step, model):
        self.tuner.update_and_allocate(step)
        return []

    # ----- resume ----------------------------------------------------------------------------
    # The allocator's importance EMAs drive every later budget decision, and the final phase masks
    # with the saved rank_pattern (peft crashes there without one), so both are method state.
    # The masked entries of E are zeros in the weights themselves and come back with them.
    def state_dict(self) -> dict:
        alloc = self.tuner.rankallocator
        return {"rank_pattern": self._config().rank_pattern,
                **{k: {n: t.detach().cpu() for n, t in getattr(alloc, k).items()} for k in ALLOCATOR_STATE}}

    def load_state_dict(self, state: dict) -> None:
        alloc, params = self.tuner.rankallocator, dict(self.tuner.model.named_parameters())
        for key in ALLOCATOR_STATE:
            setattr(alloc, key, {n: t.to(params[n].device) for n, t in state[key].items()})
        self._config().rank_pattern = state["rank_pattern"]

    def _config(self):
        return self.tuner.peft_config[self.tuner.trainable_adapter_name]


ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _factors(tuner):
    """(P, Q) = (lora_A, lora_B) of every trainable AdaLoRA matrix."""
    name = tuner.trainable_adapter_name
    return [(m.lora_A[name], m.lora_B[name]) for m in tuner.model.modules()
            if isinstance(m, AdaLoraLayer) and name in m.lora_A]


def build_adalora(model, opts: AdaLoraOptions, ctx: BuildContext):
    if opts.tinit + opts.tfinal >= ctx.total_steps:
        raise ValueError(f"adapter.tinit + adapter.tfinal ({opts.tinit} + {opts.tfinal}) leave no steps for AdaLoRA "
                         f"to reallocate ranks in train.max_steps={ctx.total_steps}; lower them")
    cfg = AdaLoraConfig(
        init_r=opts.init_r, target_r=opts.target_r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
        target_modules=opts.target_modules, tinit=opts.tinit, tfinal=opts.tfinal, deltaT=opts.delta_t,
        beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.orth_reg_weight,
        total_step=ctx.total_steps, task_type=peft_task_type(ctx.task),
    )
    peft_model = get_peft_model(model, cfg)
    return peft_model, AdaLoraHooks(peft_model, opts)


register_adapter(AdapterSpec("adalora", AdaLoraOptions, build_adalora))
