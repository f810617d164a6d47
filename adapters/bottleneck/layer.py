"""The bottleneck module and the peft layer that puts one after a frozen linear layer.

Houlsby form: the adapter reads the sub-layer output h = W x + b and adds to it,
h' = h + W_up GELU(W_down h + b_down) + b_up, before the residual add and LayerNorm that follow.
W_up and b_up start at zero, so the adapted model starts exactly as the base model. The GELU
makes the adapter non-linear: it cannot be merged into W.
"""
from __future__ import annotations

from adapters.base import NotMergeableError
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer

NOT_MERGEABLE = ("bottleneck adapters are non-linear (W_up GELU(W_down h)), so they are no weight update and cannot "
                 "be merged into the base model; keep the adapter attached (PeftModel) to use it")


class Bottleneck(nn.Module):
    """h -> W_up GELU(W_down h + b_down) + b_up, width -> r -> width; outputs exactly 0 at start."""

    def __init__(self, width: int, r: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Linear(width, r)  # torch's default init: the hidden units see the input from step one
        self.up = nn.Linear(r, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(h))))


class BottleneckLayer(BaseTunerLayer):
    adapter_layer_names = ("bottleneck_adapter",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.bottleneck_adapter = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"bottleneck adapters follow nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, r: int, dropout: float, inference_mode: bool = False) -> None:
        self.bottleneck_adapter[adapter_name] = Bottleneck(self.out_features, r, dropout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotMergeableError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        pass  # nothing is ever merged


class BottleneckLinear(nn.Module, BottleneckLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, dropout: float,
                 inference_mode: bool = False, **kwargs) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, dropout, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.bottleneck_adapter:
                adapter = self.bottleneck_adapter[name]
                result = result + adapter(self._cast_input_dtype(result, adapter.up.weight.dtype)).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
