"""(IA)^3 through peft: learned rescaling vectors on keys, values and the MLP."""
from __future__ import annotations

from typing import Literal, Optional

from peft import IA3Config, get_peft_model
from pydantic import Field

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.tasks import peft_task_type


class IA3Options(AdapterOptions):
    type: Literal["ia3"] = "ia3"
    target_modules: Optional[list[str]] = Field(None, description="null = peft's default for the model type")
    feedforward_modules: Optional[list[str]] = Field(None, description="subset of target_modules scaled on the input side")


def build_ia3(model, opts: IA3Options, ctx: BuildContext):
    cfg = IA3Config(target_modules=opts.target_modules, feedforward_modules=opts.feedforward_modules,
                    task_type=peft_task_type(ctx.task))
    return get_peft_model(model, cfg), MethodHooks()


register_adapter(AdapterSpec("ia3", IA3Options, build_ia3))
