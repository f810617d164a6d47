"""TriAdaptLoRA (Liang, Wang, Zeng 2025, arXiv 2501.08008) as a peft tuner and a trainer adapter.

Importing this package registers the method twice:
  * with peft, so `get_peft_model(model, TriAdaptLoraConfig(...))` and
    `PeftModel.from_pretrained(base, path)` work for saved TriAdaptLoRA adapters;
  * with the trainer's adapter registry under `type: triadaptlora`.
See docs/methods/triadaptlora.md for the formulas and the choices made where the paper is open.
"""
from __future__ import annotations

from peft import get_peft_model

from adapters.base import AdapterSpec, BuildContext, register_adapter
from adapters.peft_types import register_tuner
from adapters.tasks import peft_task_type

from .config import PEFT_NAME, TRIADAPTLORA, TriAdaptLoraConfig, TriAdaptLoraOptions
from .hooks import TriAdaptLoraHooks, factor_pairs, matrices_to_grow
from .layer import TriAdaptLoraLayer, TriAdaptLoraLinear
from .model import TriAdaptLoraModel

__all__ = [
    "TriAdaptLoraConfig", "TriAdaptLoraHooks", "TriAdaptLoraLayer", "TriAdaptLoraLinear", "TriAdaptLoraModel",
    "TriAdaptLoraOptions", "build_triadaptlora", "factor_pairs", "matrices_to_grow",
]

register_tuner(PEFT_NAME, TriAdaptLoraConfig, TriAdaptLoraModel)


def peft_config_from_options(opts: TriAdaptLoraOptions, ctx: BuildContext) -> TriAdaptLoraConfig:
    return TriAdaptLoraConfig(
        r=opts.r, init_rank=opts.init_rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
        target_modules=opts.target_modules, target_total_rank=opts.target_total_rank,
        incre_rank_num=opts.incre_rank_num, init_warmup=opts.init_warmup, incre_interval=opts.incre_interval,
        growth_mode=opts.growth_mode, orth_reg_weight=opts.orth_reg_weight, total_step=ctx.total_steps,
        init_core=opts.init_core, scaling=opts.scaling,
        task_type=peft_task_type(ctx.task),
    )


def build_triadaptlora(model, opts: TriAdaptLoraOptions, ctx: BuildContext):
    peft_model = get_peft_model(model, peft_config_from_options(opts, ctx))
    return peft_model, TriAdaptLoraHooks(peft_model, seed=ctx.seed)


# growth changes the trainable set mid-run, which ZeRO's static partitioning cannot follow
register_adapter(AdapterSpec(PEFT_NAME, TriAdaptLoraOptions, build_triadaptlora, adds_parameters=True))
