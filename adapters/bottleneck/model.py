"""BottleneckModel: the peft tuner that puts a bottleneck adapter after every target linear layer."""
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

    def _check_merge_allowed(self):
        raise NotMergeableError(NOT_MERGEABLE)
