"""The IAA layer: an inside bottleneck after a frozen linear layer, and its aside module.

With l = 1..L the inside modules in forward order, y_l the frozen output they follow:
    d_l = Inside_l(y_l)                      inside module (bottleneck, zero-initialised output)
    a_l = s_{l-1} + d_l,  s_0 = 0             the pathway collects it
    s_l = a_l + Aside_l(a_l)                  aside module (bottleneck, zero-initialised output)
and the layer outputs y_l + d_l for l < L, y_L + s_L for the last one: the pathway rejoins the
network at its top. With pathway "none" there is no aside module and every layer outputs y_l + d_l.

The running state s travels through a `Pathway` object shared by the layers of one adapter; it
holds activations of the current forward pass only, never weights.
"""
from __future__ import annotations

from adapters.base import NotMergeableError
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.bottleneck.layer import Bottleneck

NOT_MERGEABLE = ("IAA cannot be merged into the base model: its inside modules are non-linear bottlenecks and its "
                 "aside pathway carries a state across layers, neither of which is a weight update of a frozen layer; "
                 "keep the adapter attached (PeftModel.from_pretrained) to use it")


GRADIENT_CHECKPOINTING = ("IAA's aside pathway carries a state from layer to layer during the forward pass, which "
                          "gradient checkpointing's recomputation (layer by layer, in reverse) breaks; train without "
                          "gradient checkpointing (train.gradient_checkpointing=false)")


class Pathway:
    """The aside state s of each adapter during one forward pass, handed from layer to layer."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def advance(self, adapter: str, position: int, last: bool, inside: torch.Tensor, aside: nn.Module) -> torch.Tensor:
        """s_l = a_l + Aside_l(a_l), a_l = s_{l-1} + d_l (a forward pass starts at position 0 with s_0 = 0)."""
        if position == 0:
            collected = inside
        else:
            previous = self.state.get(adapter)
            if previous is None:
                raise RuntimeError(f"IAA pathway of adapter {adapter!r}: layer {position} ran before layer 0 of the "
                                   "same forward pass (the layers must run in model order, once each). "
                                   + GRADIENT_CHECKPOINTING)
            collected = previous + inside
        state = collected + aside(collected)
        # the last layer hands the state to the network; dropping it here keeps no activations alive
        self.state[adapter] = None if last else state
        return state


class IAALayer(BaseTunerLayer):
    adapter_layer_names = ("iaa_inside", "iaa_aside")
    other_param_names = ("iaa_position", "iaa_last")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.iaa_inside = nn.ModuleDict()
        self.iaa_aside = nn.ModuleDict()  # only adapters with pathway "chain" have one
        self.iaa_position: dict[str, int] = {}  # this layer's index l - 1 in the adapter's pathway
        self.iaa_last: dict[str, bool] = {}
        self.iaa_pathway: Optional[Pathway] = None  # set by IAAModel once every layer exists
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IAA inside modules follow nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, r: int, aside_r: int, pathway: str, dropout: float,
                     inference_mode: bool = False) -> None:
        self.iaa_inside[adapter_name] = Bottleneck(self.out_features, r, dropout)
        if pathway == "chain":
            self.iaa_aside[adapter_name] = Bottleneck(self.out_features, aside_r)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotMergeableError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        pass  # nothing is ever merged


class IAALinear(nn.Module, IAALayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, aside_r: int, pathway: str, dropout: float,
                 inference_mode: bool = False, **kwargs) -> None:
        super().__init__()
        IAALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, aside_r, pathway, dropout, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.iaa_inside:
                continue
            inside_module = self.iaa_inside[name]
            inside = inside_module(self._cast_input_dtype(result, inside_module.up.weight.dtype))
            if name not in self.iaa_aside:  # scattered: a plain adapter
                result = result + inside.to(result.dtype)
                continue
            if name not in self.iaa_position:
                raise RuntimeError("IAA layer used before IAAModel linked its pathway")
            last = self.iaa_last[name]
            state = self.iaa_pathway.advance(name, self.iaa_position[name], last, inside, self.iaa_aside[name])
            result = result + (state if last else inside).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "iaa." + super().__repr__()
