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
    # peft scales the update by alpha / init_r. AdaLoRA's scripts run at 5.3-10.7 (alpha 16-32 with
    # init_r 2-3; SST-2: 16 / 2 = 8); at LoRA's 2 the singular values E, one scalar per rank, move
    # too little per Adam step and a few hundred steps leave the model unchanged (issue 11)
    alpha: Optional[float] = Field(None, gt=0, description="scale numerator: dW = alpha / init_r * P diag(E) Q; "
                                                            "null = 8 x init_r (scale 8, AdaLoRA's SST-2 script)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None
    # AdaLoRA's own GLUE scripts start pruning after ~10 % of the steps and hold the final budget
    # for the last ~50 % (MNLI 8000/50000 of 86k, SST-2 6000/22000 of 50k, CoLA 800/3500 of 6.7k)
    tinit: Optional[int] = Field(None, ge=0, description="steps of warm-up before pruning starts; null = 10 % of max_steps")
    tfinal: Optional[int] = Field(None, ge=0, description="final steps with the budget fixed; null = 50 % of max_steps")
    delta_t: int = Field(1, ge=1, description="steps between budget reallocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of uncertainty")
    orth_reg_weight: float = Field(0.1, ge=0, description="0.1 as every script of the paper; peft's default is 0.5")

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


def budget_phases(opts: AdaLoraOptions, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal): the explicit values, or 10 % and 50 % of the run as in AdaLoRA's scripts."""
    tinit = opts.tinit if opts.tinit is not None else round(0.1 * total_steps)
    tfinal = opts.tfinal if opts.tfinal is not None else round(0.5 * total_steps)
    return tinit, tfinal


def build_adalora(model, opts: AdaLoraOptions, ctx: BuildContext):
    tinit, tfinal = budget_phases(opts, ctx.total_steps)
    if tinit + tfinal >= ctx.total_steps:
        raise ValueError(f"adapter.tinit + adapter.tfinal ({tinit} + {tfinal}) leave no steps for AdaLoRA "
                         f"to reallocate ranks in train.max_steps={ctx.total_steps}; lower them")
    if ctx.total_steps - tfinal < 2:
        # peft scores ranks only on steps before total_step - tfinal and fixes the final budget at that
        # step from those scores; with none gathered its allocator fails on a missing score (KeyError).
        enough = next(n for n in range(ctx.total_steps + 1, ctx.total_steps + 10_000)
                      if n - budget_phases(opts, n)[1] >= 2 and sum(budget_phases(opts, n)) < n)
        raise ValueError(f"train.max_steps={ctx.total_steps} with adapter.tfinal={tfinal}: AdaLoRA fixes its final "
                         f"budget at step {ctx.total_steps - tfinal} from the importance scores of the steps before "
                         f"it, and there are none; raise train.max_steps to {enough} or more")
    cfg = AdaLoraConfig(
        init_r=opts.init_r, target_r=opts.target_r, lora_alpha=opts.alpha if opts.alpha is not None else 8.0 * opts.init_r,
        lora_dropout=opts.dropout,
        target_modules=opts.target_modules, tinit=tinit, tfinal=tfinal, deltaT=opts.delta_t,
        beta1=opts.beta1, beta2=opts.beta2, orth_reg_weight=opts.orth_reg_weight,
        total_step=ctx.total_steps, task_type=peft_task_type(ctx.task),
    )
    peft_model = get_peft_model(model, cfg)
    return peft_model, AdaLoraHooks(peft_model, opts)


register_adapter(AdapterSpec(
    "adalora", AdaLoraOptions, build_adalora,
    no_partitioned_weights="peft's rank allocator multiplies each whole weight by its gradient and masks ranks "
                           "in place, and its orthogonality penalty needs the whole factors"))
