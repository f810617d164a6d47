"""Bottleneck (Houlsby) adapter configuration: the peft config saved with the adapter, and the
trainer options (`adapter.type: bottleneck`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from pydantic import Field

from adapters.base import AdapterOptions
from adapters.peft_types import ensure_peft_type

PEFT_NAME = "bottleneck"
BOTTLENECK = ensure_peft_type(PEFT_NAME.upper())

# Houlsby et al. 2019 place one adapter after the attention output projection and one after the
# feed-forward output projection of every layer (before the residual add and LayerNorm).
HOULSBY_TARGETS = {
    # names, not a regex, so `layers_to_transform` applies to the default placement too
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ["attention.output.dense", "output.dense"]),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), ["o_proj", "down_proj"]),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """peft config of a bottleneck adapter: h -> h + W_up GELU(W_down h) on each target's output."""

    r: int = field(default=8, metadata={"help": "bottleneck width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names/suffixes or a regex; None = the Houlsby placement per model type"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules never adapted"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra trainable modules saved with the adapter (e.g. a classifier head)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            # peft matches a regex against the whole module name, so layer indices would be ignored (LoRA refuses too)
            raise ValueError("`layers_to_transform` and `layers_pattern` cannot be used when `target_modules` is a "
                             "regex (a str); list module names instead")
        if self.r < 1:
            raise ValueError(f"bottleneck width r must be >= 1, got {self.r}")


class BottleneckOptions(AdapterOptions):
    """The `adapter:` section for `type: bottleneck`."""

    type: Literal["bottleneck"] = "bottleneck"
    r: int = Field(8, ge=1, description="bottleneck width (parameters per adapter: 2 x width x r + width + r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: Optional[list[str]] = Field(
        None, description="module name suffixes; null = attention and FFN output projections (Houlsby)")
