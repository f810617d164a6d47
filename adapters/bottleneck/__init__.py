"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP") as
a small peft tuner, `adapter.type: bottleneck`: a baseline for IAA (docs/methods/iaa.md).

Importing this package registers the tuner with peft (so `PeftModel.from_pretrained` loads saved
bottleneck adapters) and with the trainer's adapter registry.
"""
from __future__ import annotations

from peft import get_peft_model

from adapters.base import AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.peft_types import register_tuner
from adapters.tasks import peft_task_type

from .config import PEFT_NAME, BottleneckConfig, BottleneckOptions
from .layer import Bottleneck, BottleneckLayer, BottleneckLinear
from .model import BottleneckModel

__all__ = ["Bottleneck", "BottleneckConfig", "BottleneckLayer", "BottleneckLinear", "BottleneckModel",
           "BottleneckOptions", "build_bottleneck"]

register_tuner(PEFT_NAME, BottleneckConfig, BottleneckModel)


def build_bottleneck(model, opts: BottleneckOptions, ctx: BuildContext):
    config = BottleneckConfig(r=opts.r, dropout=opts.dropout, target_modules=opts.target_modules,
                              task_type=peft_task_type(ctx.task))
    return get_peft_model(model, config), MethodHooks()


register_adapter(AdapterSpec(PEFT_NAME, BottleneckOptions, build_bottleneck))
