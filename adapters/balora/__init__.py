"""BA-LoRA (Chang, Chang, Wu; arXiv 2408.04556, ICLR 2026): PiSSA-initialised LoRA plus three
bias-alleviating regularisers (consistency, diversity, SVD), registered as `type: balora`.

In peft terms BA-LoRA *is* LoRA (peft's own LoraModel with init_lora_weights="pissa"); the
method lives in the loss. So there is no new peft type to register: checkpoints are LoRA
adapters, and `save_adapter` exports one that loads onto the original base model with plain
`PeftModel.from_pretrained`. See docs/methods/balora.md.
"""
from __future__ import annotations

from peft import LoraConfig, get_peft_model

from adapters.base import AdapterSpec, BuildContext, register_adapter
from adapters.tasks import peft_task_type

from .config import BaLoraOptions, ResolvedSettings, resolve
from .export import INITIAL_ATTR, save_adapter
from .hooks import BaLoraHooks
from .initial import InitialAdapter

__all__ = ["BaLoraHooks", "BaLoraOptions", "InitialAdapter", "ResolvedSettings", "build_balora", "save_adapter"]


def lora_config_from_options(opts: BaLoraOptions, ctx: BuildContext) -> LoraConfig:
    init = "pissa" if opts.pissa_niter is None else f"pissa_niter_{opts.pissa_niter}"
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=opts.target_modules,
                      init_lora_weights=init, task_type=peft_task_type(ctx.task))


def build_balora(model, opts: BaLoraOptions, ctx: BuildContext):
    peft_model = get_peft_model(model, lora_config_from_options(opts, ctx))
    initial = InitialAdapter(peft_model)
    # a plain attribute (not a submodule), so export can find it without it entering any state dict
    object.__setattr__(peft_model, INITIAL_ATTR, initial)
    return peft_model, BaLoraHooks(resolve(opts, ctx.task), initial, ctx.total_steps)


register_adapter(AdapterSpec("balora", BaLoraOptions, build_balora, save_adapter=save_adapter))
