"""BottleneckModel: the peft tuner that puts a bottleneck adapter after every target linear layer.

Saved keys hold no adapter name, as peft's own tuners' (an adapter saved as "default" loads under
any name): the name sits one level deeper than peft's default key mapping expects
(`bottleneck_adapter.<name>.up.weight`, a module per adapter), so the mapping is overridden.
"""
from __future__ import annotations

from adapters.base import NotMergeableError
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .config import HOULSBY_TARGETS, PEFT_NAME, BottleneckConfig
from .layer import NOT_MERGEABLE, BottleneckLayer, BottleneckLinear


class BottleneckModel(BaseTuner):
    prefix: str = PEFT_NAME + "_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = HOULSBY_TARGETS

    def _create_and_replace(self, config: BottleneckConfig, adapter_name, target, target_name, parent,
                            current_key, **optional_kwargs) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, config.r, config.dropout, inference_mode=config.inference_mode)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"bottleneck adapters follow nn.Linear layers only; {current_key} is {type(base).__name__}")
        new_module = BottleneckLinear(target, adapter_name, config.r, config.dropout, inference_mode=config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return remove_nested_adapter_name(key, adapter_name, cls.tuner_layer_cls.adapter_layer_names)

    def _check_merge_allowed(self):
        raise NotMergeableError(NOT_MERGEABLE)


def remove_nested_adapter_name(key: str, adapter_name: str, containers: tuple[str, ...]) -> str:
    """`...<container>.<adapter_name>.<rest>` -> `...<container>.<rest>` (the checkpoint key). peft
    uses this one mapping both ways (save: strip; load: the inverse, built from the model's keys)."""
    for container in containers:
        marker = f".{container}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{container}.", 1)
    return BaseTuner._remove_adapter_name_from_key(key, adapter_name)
