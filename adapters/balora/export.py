"""Export a trained BA-LoRA (PiSSA) adapter as a plain LoRA adapter for the ORIGINAL base model.

Training runs on W_res = W - s B0 A0 with the adapter (A, B), i.e. on W + s (B A - B0 A0). That
difference is itself a LoRA update of rank 2r:
    B A - B0 A0 = [B | -B0] [A ; A0]
so the exported adapter has A' = [A ; A0] (2r x d_in), B' = [B | -B0] (d_out x 2r) and
alpha' = 2 alpha, which keeps the scale s = alpha'/r' = alpha/r. It loads with
`PeftModel.from_pretrained(original_base, out_dir)` and needs neither the residual model nor
this package. This is the same conversion peft performs for
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`, computed here from the
in-memory initial adapter instead of a second adapter directory saved before training.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from .initial import InitialAdapter

INITIAL_ATTR = "_balora_initial"  # where build() leaves the InitialAdapter on the PeftModel


def save_adapter(peft_model, out_dir: str, state_dict: Optional[dict] = None, adapter_name: str = "default") -> str:
    """Write `out_dir/adapter_config.json` + `adapter_model.safetensors` (LoRA, original base).

    `state_dict`: the model's full state dict when the caller had to gather it (ZeRO-3), else None.
    The signature matches `AdapterSpec.save_adapter`, which the trainer's final save calls.
    """
    initial: InitialAdapter | None = getattr(peft_model, INITIAL_ATTR, None)
    if initial is None:
        raise ValueError("not a BA-LoRA model: build it with the balora adapter to keep its initial adapter")
    config = peft_model.peft_config[adapter_name]
    if config.use_rslora:
        raise ValueError("the rank-doubling conversion assumes alpha/r scaling, not rsLoRA")

    trained = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=adapter_name)
    with initial.swapped():  # same keys, values (A0, B0); the frozen copies are never partitioned
        init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}

    tensors = {}
    for key, value in trained.items():
        if key.endswith("lora_A.weight"):
            value = torch.cat([value, init[key]], dim=0)
        elif key.endswith("lora_B.weight"):
            value = torch.cat([value, -init[key]], dim=1)
        tensors[key] = value.detach().contiguous().cpu()  # other entries (e.g. a classifier head) as trained

    out = copy.deepcopy(config)
    out.r, out.lora_alpha = 2 * config.r, 2 * config.lora_alpha
    out.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    out.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    out.init_lora_weights = True  # loading must not run PiSSA on the original weights again
    out.inference_mode = True
    if out.base_model_name_or_path is None:
        out.base_model_name_or_path = getattr(peft_model.base_model.model, "name_or_path", None) or None

    os.makedirs(out_dir, exist_ok=True)
    out.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
