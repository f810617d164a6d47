"""`adapter.type=prefix`: prefix tuning (Li & Liang 2021) through peft's PrefixTuningConfig.

Trainable key/value vectors are prepended to every attention layer (peft hands them to the model
as a key/value cache). Limits of peft 0.21 with transformers 5: the prefix occupies the first
`num_virtual_tokens` positions, so the real tokens' position ids start after it; and peft cannot
reach the encoder of a sequence-classification head (the classifier's forward no longer takes
`past_key_values`), so `reranking` and `sequence_classification` are refused.
"""
from __future__ import annotations

from typing import Literal, Optional

from peft import PrefixTuningConfig, get_peft_model
from pydantic import Field

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter
from adapters.tasks import peft_task_type

UNSUPPORTED_TASKS = ("sequence_classification", "reranking")


class PrefixOptions(AdapterOptions):
    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, description="prefix length: parameters = 2 x layers x hidden x length")
    projection: bool = Field(False, description="reparametrise the prefix through a 2-layer MLP (Li & Liang)")
    projection_hidden: Optional[int] = Field(None, ge=1, description="hidden width of that MLP; null = the model width")


def build_prefix(model, opts: PrefixOptions, ctx: BuildContext):
    if ctx.task in UNSUPPORTED_TASKS:
        raise ValueError(f"adapter.type=prefix cannot train model.task={ctx.task}: peft 0.21 cannot pass a prefix "
                         "through a transformers 5 classification head; use it with retrieval or causal_lm")
    config = PrefixTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, prefix_projection=opts.projection,
                                encoder_hidden_size=opts.projection_hidden or model.config.hidden_size,
                                task_type=peft_task_type(ctx.task))
    return get_peft_model(model, config), MethodHooks()


register_adapter(AdapterSpec("prefix", PrefixOptions, build_prefix, tasks=("causal_lm", "retrieval"),
                             no_gradient_checkpointing="peft's prefix tuning passes the prefix as a key/value cache, "
                                                       "which gradient checkpointing does not support"))
