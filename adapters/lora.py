"""LoRA and DoRA through peft's own LoraModel."""
from __future__ import annotations

from typing import Literal, Optional

from peft import LoraConfig, get_peft_model
from pydantic import Field

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.tasks import peft_task_type


class LoraOptions(AdapterOptions):
    type: Literal["lora", "dora"] = "lora"
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16, gt=0, description="scale numerator: ΔW = alpha/r · B A")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = Field(None, description="module name suffixes; null = peft's default for the model type")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="initialisation of A and B")
    use_rslora: bool = Field(False, description="scale alpha/sqrt(r) instead of alpha/r")
    bias: Literal["none", "all", "lora_only"] = "none"


def lora_config(opts: LoraOptions, ctx: BuildContext, **extra) -> LoraConfig:
    return LoraConfig(
        r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=opts.target_modules,
        init_lora_weights=True if opts.init == "default" else opts.init, use_rslora=opts.use_rslora,
        bias=opts.bias, task_type=peft_task_type(ctx.task), use_dora=opts.type == "dora", **extra,
    )


def build_lora(model, opts: LoraOptions, ctx: BuildContext):
    return get_peft_model(model, lora_config(opts, ctx)), MethodHooks()


register_adapter(AdapterSpec("lora", LoraOptions, build_lora))
register_adapter(AdapterSpec("dora", LoraOptions, build_lora))
