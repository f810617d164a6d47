"""IAA configuration: the peft config saved with the adapter, and the trainer options
(`adapter.type: iaa`). See docs/methods/iaa.md for the architecture."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from pydantic import Field

from adapters.base import AdapterOptions
from adapters.bottleneck.config import HOULSBY_TARGETS
from adapters.peft_types import ensure_peft_type

PEFT_NAME = "iaa"
IAA = ensure_peft_type(PEFT_NAME.upper())
PATHWAYS = ("chain", "none")

# The inside modules sit where Houlsby adapters do: after each layer's attention output and
# feed-forward output projections (before their residual adds), two per layer.
INSIDE_TARGETS = HOULSBY_TARGETS


@dataclass
class IAAConfig(PeftConfig):
    """peft config of an IAA ("Inside and Aside") adapter."""

    r: int = field(default=4, metadata={"help": "width of each inside bottleneck module"})
    aside_r: Optional[int] = field(default=None, metadata={"help": "width of each aside bottleneck module; None = r"})
    pathway: str = field(default="chain", metadata={
        "help": "'chain': aside modules connect the inside modules into one pathway to the top; "
                "'none': scattered inside modules only (the ablation)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the inside modules' input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "where the inside modules go (module names/suffixes or a regex); "
                                        "None = each layer's attention and FFN output projections"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules never adapted"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra trainable modules saved with the adapter (e.g. a classifier head)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = IAA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            # peft matches a regex against the whole module name, so layer indices would be ignored (LoRA refuses too)
            raise ValueError("`layers_to_transform` and `layers_pattern` cannot be used when `target_modules` is a "
                             "regex (a str); list module names instead")
        if self.aside_r is None:
            self.aside_r = self.r
        if self.r < 1 or self.aside_r < 1:
            raise ValueError(f"IAA needs r >= 1 and aside_r >= 1, got {self.r} and {self.aside_r}")
        if self.pathway not in PATHWAYS:
            raise ValueError(f"pathway must be one of {PATHWAYS}, got {self.pathway!r}")


class IAAOptions(AdapterOptions):
    """The `adapter:` section for `type: iaa`."""

    type: Literal["iaa"] = "iaa"
    r: int = Field(4, ge=1, description="width of each inside bottleneck module")
    aside_r: Optional[int] = Field(None, ge=1, description="width of each aside bottleneck module; null = r")
    pathway: Literal["chain", "none"] = Field(
        "chain", description="chain: aside modules connect the inside modules into one pathway; none: scattered (ablation)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the inside modules' input")
    target_modules: Optional[list[str]] = Field(
        None, description="where the inside modules go; null = each layer's attention and FFN output projections")
