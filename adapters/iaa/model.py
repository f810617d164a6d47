"""IAAModel: the peft tuner that injects the inside modules and links them, through their aside
modules, into one pathway (see layer.py for the equations, docs/methods/iaa.md for the why).

Linking happens after every injection (peft's `get_peft_model`, `PeftModel.from_pretrained` and
`add_adapter` all go through `inject_adapter`): the adapter's layers, in model order, get their
position in the pathway, and the last one is marked as where the pathway rejoins the network.
Model order is forward order for the supported architectures (BERT-, Llama-style stacks).
"""
from __future__ import annotations

from adapters.base import NotMergeableError
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from adapters.bottleneck.model import remove_nested_adapter_name

from .config import INSIDE_TARGETS, PEFT_NAME, IAAConfig
from .layer import GRADIENT_CHECKPOINTING, NOT_MERGEABLE, IAALayer, IAALinear, Pathway


class IAAModel(BaseTuner):
    prefix: str = PEFT_NAME + "_"
    tuner_layer_cls = IAALayer
    target_module_mapping = INSIDE_TARGETS
    # the layers share a Pathway object created here, so bare `inject_adapter_in_model` cannot build one
    uses_shared_state = True

    def _create_and_replace(self, config: IAAConfig, adapter_name, target, target_name, parent,
                            current_key, **optional_kwargs) -> None:
        args = (config.r, config.aside_r, config.pathway, config.dropout)
        if isinstance(target, IAALayer):
            target.update_layer(adapter_name, *args, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IAA inside modules follow nn.Linear layers only; {current_key} is {type(base).__name__}")
        new_module = IAALinear(target, adapter_name, *args, inference_mode=config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, **kwargs)
        self.link_pathway(model, adapter_name)

    def link_pathway(self, model: nn.Module, adapter_name: str) -> None:
        layers = pathway_layers(model, adapter_name)
        if not layers:
            return
        widths = {layer.out_features for layer in layers}
        if len(widths) > 1:
            raise ValueError(f"IAA's pathway adds up the inside modules' outputs, so every target needs the same "
                             f"output width; got {sorted(widths)} (e.g. leave out the FFN up-projection)")
        if "iaa_pathway" not in self.__dict__:
            self.__dict__["iaa_pathway"] = Pathway()  # a plain attribute: activations, not weights
        for position, layer in enumerate(layers):
            layer.iaa_position[adapter_name] = position
            layer.iaa_last[adapter_name] = position == len(layers) - 1
            layer.iaa_pathway = self.__dict__["iaa_pathway"]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # keys `iaa_inside.<name>.up.weight`: the name one level deeper than peft expects (see bottleneck)
        return remove_nested_adapter_name(key, adapter_name, cls.tuner_layer_cls.adapter_layer_names)

    def _prepare_model(self, peft_config: IAAConfig, model: nn.Module) -> None:
        # peft calls this before injecting, on every path (get_peft_model, from_pretrained, add_adapter)
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(GRADIENT_CHECKPOINTING)

    def _check_merge_allowed(self):
        raise NotMergeableError(NOT_MERGEABLE)


def pathway_layers(model: nn.Module, adapter_name: str) -> list[IAALayer]:
    """The adapter's IAA layers in model (= forward) order."""
    return [m for m in model.modules() if isinstance(m, IAALayer) and adapter_name in m.iaa_inside]
