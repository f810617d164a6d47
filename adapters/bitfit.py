"""`adapter.type=bitfit`: only the bias terms train (Ben Zaken, Ravfogel, Goldberg 2022, "BitFit").

A freshly initialised task head (a re-ranker's or classifier's `classifier`/`score` layer) trains
whole, as peft does for its methods: a frozen random head could not be fitted through biases
alone. The biases are spread over every layer, so the result is saved as a whole model.
"""
from __future__ import annotations

from typing import Literal

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter

HEADS = ("classifier", "score")


class BitFitOptions(AdapterOptions):
    type: Literal["bitfit"] = "bitfit"


def is_trainable(name: str, task: str) -> bool:
    head = task in ("sequence_classification", "reranking") and name.split(".")[0] in HEADS
    return head or name.endswith(".bias") or name == "bias"


def build_bitfit(model, opts: BitFitOptions, ctx: BuildContext):
    if not any(name.endswith("bias") for name, _ in model.named_parameters()):
        raise ValueError("adapter.type=bitfit trains bias terms, and this model has none (Llama-style decoders "
                         "drop them); choose another adapter")
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, ctx.task))
    return model, MethodHooks()


# an encoder method: the Llama-family decoders the causal_lm task uses have no bias terms
register_adapter(AdapterSpec("bitfit", BitFitOptions, build_bitfit, kind="full",
                             tasks=("sequence_classification", "retrieval", "reranking")))
