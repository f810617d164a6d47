"""IAA, "Inside and Aside" connected parameter-efficient tuning (after Ma, Guo, Zhang, Fan, Cheng:
"Scattered or Connected? An Optimized Parameter-efficient Tuning Approach for Information
Retrieval", CIKM 2022), as a peft tuner and a trainer adapter, `adapter.type: iaa`.

The paper's body was not available: the architecture is our reading of its abstract (inside
modules in every layer, aside modules that connect them into one pathway), documented with its
equations in docs/methods/iaa.md. Importing this package registers the tuner with peft (so
`PeftModel.from_pretrained` loads saved IAA adapters) and with the trainer's adapter registry.
"""
from __future__ import annotations

from peft import get_peft_model

from adapters.base import AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.peft_types import register_tuner
from adapters.tasks import peft_task_type

from .config import PEFT_NAME, IAAConfig, IAAOptions
from .layer import GRADIENT_CHECKPOINTING, IAALayer, IAALinear, Pathway
from .model import IAAModel, pathway_layers

__all__ = ["IAAConfig", "IAALayer", "IAALinear", "IAAModel", "IAAOptions", "Pathway", "build_iaa", "pathway_layers"]

register_tuner(PEFT_NAME, IAAConfig, IAAModel)


def iaa_config_from_options(opts: IAAOptions, ctx: BuildContext) -> IAAConfig:
    return IAAConfig(r=opts.r, aside_r=opts.aside_r, pathway=opts.pathway, dropout=opts.dropout,
                     target_modules=opts.target_modules, task_type=peft_task_type(ctx.task))


def build_iaa(model, opts: IAAOptions, ctx: BuildContext):
    return get_peft_model(model, iaa_config_from_options(opts, ctx)), MethodHooks()


register_adapter(AdapterSpec(PEFT_NAME, IAAOptions, build_iaa, no_gradient_checkpointing=GRADIENT_CHECKPOINTING))
