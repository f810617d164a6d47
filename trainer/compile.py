"""`train.compile: true`: compile each decoder layer with torch.compile, in place.

Layer by layer rather than the whole model: every layer runs the same code, so one compiled
graph serves them all (parameters are graph inputs); the output layer and the loss stay eager,
where trainer.loss_positions hooks them; parameter names and state dicts do not change (no
`_orig_mod.` prefix), so checkpoints, resume and export work as without it. Variable-length
batches recompile once with dynamic shapes, then reuse the graph. Attention on packed rows
(trainer.varlen_attention) runs eagerly inside the compiled layer.

Random ops (LoRA's dropout) keep torch's own generator (inductor's `fallback_random`): a compiled
run draws the same dropout masks as an eager one, so its losses match the eager run's up to
float rounding instead of following another random stream.
"""
from __future__ import annotations

import torch._inductor.config as inductor_config
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def compile_layers(model: nn.Module) -> int:
    """Compile every transformers decoder/encoder layer of `model`; returns how many."""
    inductor_config.fallback_random = True
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)
