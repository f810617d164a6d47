"""TriAdaptLoraModel: the peft tuner that injects TriAdaptLoRA layers and keeps rank_pattern current.

Loading a grown adapter works because layers are created from `config.rank_pattern` (one list
of block sizes per module), so their parameter shapes match the checkpoint before peft loads
it. The pattern is refreshed from the live layers whenever the adapter state dict is taken, so
`save_pretrained` always writes the ranks the weights actually have.

The orthogonality penalty is not added to `outputs.loss` here (AdaLoRA does that); the trainer
computes its own loss, so the penalty is returned by the hooks as the "reg/orth" term.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import PEFT_NAME, TriAdaptLoraConfig
from .layer import TriAdaptLoraLayer, TriAdaptLoraLinear


class TriAdaptLoraModel(BaseTuner):
    prefix: str = PEFT_NAME + "_"
    tuner_layer_cls = TriAdaptLoraLayer
    # same defaults as LoRA: q_proj,v_proj for Llama, query,value for BERT/RoBERTa, ...
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: TriAdaptLoraConfig, adapter_name, target, target_name, parent,
                            current_key, **optional_kwargs) -> None:
        blocks = config.rank_pattern.get(current_key, [config.init_rank])
        shape = {"init_core": config.init_core, "scale_rank": config.r if config.scaling == "reference_rank" else None}
        if isinstance(target, TriAdaptLoraLayer):
            target.update_layer(adapter_name, blocks, config.lora_alpha, config.lora_dropout,
                                inference_mode=config.inference_mode, **shape)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"TriAdaptLoRA adapts nn.Linear only; {current_key} is {type(base).__name__}")
        new_module = TriAdaptLoraLinear(target, adapter_name, blocks, config.lora_alpha, config.lora_dropout,
                                        inference_mode=config.inference_mode, **shape)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ----- rank bookkeeping ------------------------------------------------------------------
    def adapted_layers(self, adapter_name: str) -> dict[str, TriAdaptLoraLayer]:
        """Module key (relative to the wrapped model, as in rank_pattern) -> layer, in model order."""
        return _layers_of(self.model, adapter_name)

    def current_rank_pattern(self, adapter_name: str) -> dict[str, list[int]]:
        return {k: layer.block_sizes(adapter_name) for k, layer in self.adapted_layers(adapter_name).items()}

    def sync_rank_pattern(self, adapter_name: str) -> None:
        self.peft_config[adapter_name].rank_pattern = self.current_rank_pattern(adapter_name)

    def resize_to_rank_pattern(self, rank_pattern: dict[str, list[int]], adapter_name: str) -> None:
        """Append growth blocks until every layer has the block sizes of `rank_pattern`.

        Layers only ever grow, so the live pattern must be a prefix of the requested one; the
        new blocks get placeholder values that the caller overwrites by loading weights.
        """
        layers = self.adapted_layers(adapter_name)
        missing = set(rank_pattern) - set(layers)
        if missing:
            raise KeyError(f"rank_pattern names modules that are not adapted: {sorted(missing)}")
        for key, blocks in rank_pattern.items():
            have = layers[key].block_sizes(adapter_name)
            if have != list(blocks[: len(have)]):
                raise ValueError(f"{key}: live blocks {have} are not a prefix of saved blocks {list(blocks)}")
            for k in blocks[len(have):]:
                layers[key].grow(adapter_name, int(k))
        self.sync_rank_pattern(adapter_name)

    # ----- saving ----------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # `model` is the PeftModel; record the ranks the saved tensors have in the saved config
        tuner = _find_tuner(model)
        inner = tuner.model if tuner is not None else model
        config.rank_pattern = {k: layer.block_sizes(adapter_name)
                               for k, layer in _layers_of(inner, adapter_name).items()}
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)


def _layers_of(model: nn.Module, adapter_name: str) -> dict[str, TriAdaptLoraLayer]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, TriAdaptLoraLayer) and adapter_name in m.triadaptlora_A}


def _find_tuner(model: nn.Module) -> Optional[TriAdaptLoraModel]:
    for m in model.modules():
        if isinstance(m, TriAdaptLoraModel):
            return m
    return None


def total_rank(tuner: TriAdaptLoraModel, adapter_name: str) -> int:
    return sum(layer.rank(adapter_name) for layer in tuner.adapted_layers(adapter_name).values())


@torch.no_grad()
def frobenius_norms(tuner: TriAdaptLoraModel, adapter_name: str) -> dict[str, float]:
    """||L + U||_F of every layer (the raw quantity behind the importance score)."""
    return {k: float(torch.linalg.matrix_norm(layer.core(adapter_name).float()))
            for k, layer in tuner.adapted_layers(adapter_name).items()}
