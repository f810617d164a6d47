"""TriAdaptLoRA configuration: the peft config saved with the adapter, and the trainer options.

The peft config (`TriAdaptLoraConfig`) is what lands in `adapter_config.json`. Besides the
usual LoRA-like fields it carries `rank_pattern`, the list of growth-block sizes of every
adapted module, so that `PeftModel.from_pretrained` can rebuild grown layers with the right
shapes. The growth-schedule fields are stored too, so a saved adapter says how it was trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from pydantic import Field

from adapters.base import AdapterOptions
from adapters.peft_types import ensure_peft_type

PEFT_NAME = "triadaptlora"
TRIADAPTLORA = ensure_peft_type(PEFT_NAME.upper())


@dataclass
class TriAdaptLoraConfig(PeftConfig):
    """peft config of a TriAdaptLoRA adapter (see docs/methods/triadaptlora.md)."""

    r: int = field(default=8, metadata={"help": "reference (target average) rank per adapted matrix"})
    init_rank: int = field(default=1, metadata={"help": "rank of every matrix before any growth"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale numerator: dW = alpha / r_current * B (L+U) A"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names/suffixes or a regex; None = peft's LoRA default per model type"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules never adapted"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra trainable modules saved with the adapter (e.g. a classifier head)"}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "module key -> list of growth-block sizes (sum = rank); missing keys use [init_rank]"},
    )
    # Growth schedule (used while training; saved so the adapter documents its own run).
    target_total_rank: Optional[int] = field(default=None, metadata={"help": "rank budget; None = r * #matrices"})
    incre_rank_num: Optional[int] = field(default=None, metadata={"help": "rank added per growth; None = max(1, r//2)"})
    init_warmup: int = field(default=0, metadata={"help": "no growth at steps <= init_warmup"})
    incre_interval: int = field(default=1, metadata={"help": "grow only at steps divisible by this"})
    growth_mode: str = field(default="linear", metadata={"help": "'linear' or 'nonlinear' threshold schedule"})
    orth_reg_weight: float = field(default=0.1, metadata={"help": "weight of the orthogonality penalty"})
    total_step: Optional[int] = field(default=None, metadata={"help": "total optimizer steps of the run"})
    init_core: str = field(default="identity", metadata={
        "help": "new blocks: 'identity' (B = 0, core diagonal = I: starts as LoRA) or 'zero' (A, B normal, core 0)"})
    scaling: str = field(default="reference_rank", metadata={
        "help": "dW = alpha / r * B (L+U) A with r = 'reference_rank' (fixed) or 'current_rank' (shrinks at growth)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = TRIADAPTLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            # peft matches a regex against the whole module name, so layer indices would be ignored (LoRA refuses too)
            raise ValueError("`layers_to_transform` and `layers_pattern` cannot be used when `target_modules` is a "
                             "regex (a str); list module names instead")
        if self.init_rank < 1 or self.r < 1:
            raise ValueError("TriAdaptLoRA needs r >= 1 and init_rank >= 1")
        if self.init_core not in ("identity", "zero"):
            raise ValueError(f"init_core must be 'identity' or 'zero', got {self.init_core!r}")
        if self.scaling not in ("reference_rank", "current_rank"):
            raise ValueError(f"scaling must be 'reference_rank' or 'current_rank', got {self.scaling!r}")
        if self.growth_mode not in ("linear", "nonlinear"):
            raise ValueError(f"growth_mode must be 'linear' or 'nonlinear', got {self.growth_mode!r}")
        # JSON turns the block lists into lists anyway; normalise so reloaded and live configs compare equal
        self.rank_pattern = {k: [int(b) for b in v] for k, v in (self.rank_pattern or {}).items()}


class TriAdaptLoraOptions(AdapterOptions):
    """The `adapter:` section for `type: triadaptlora`."""

    type: Literal["triadaptlora"] = "triadaptlora"
    r: int = Field(8, ge=1, description="reference rank: the average rank the budget allows per adapted matrix")
    init_rank: int = Field(1, ge=1, description="rank of every matrix at the start (one growth block)")
    target_total_rank: Optional[int] = Field(
        None, ge=1, description="total rank budget over all matrices; null = r x number of adapted matrices"
    )
    alpha: float = Field(16.0, gt=0, description="scale numerator: dW = alpha / r * B (L+U) A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: Optional[list[str]] = Field(
        None, description="module name suffixes; null = q_proj,v_proj for Llama, query,value for BERT (peft's LoRA table)"
    )
    growth_mode: Literal["linear", "nonlinear"] = Field(
        "linear", description="how many matrices grow: floor(remaining*p) (linear) or floor(remaining**p) (nonlinear)"
    )
    incre_rank_num: Optional[int] = Field(None, ge=1, description="rank added to a matrix per growth; null = max(1, r//2)")
    init_warmup: int = Field(0, ge=0, description="no growth at steps <= init_warmup")
    incre_interval: int = Field(1, ge=1, description="grow only at optimizer steps divisible by this")
    orth_reg_weight: float = Field(0.1, ge=0, description="weight of the AdaLoRA orthogonality penalty (reg/orth); "
                                   "0.1 as IncreLoRA's and AdaLoRA's own scripts")
    init_core: Literal["identity", "zero"] = Field(
        "identity", description="new blocks start with B = 0 and an identity core (LoRA's start), or with "
                                "A, B ~ N(0, 0.02) and a zero core (AdaLoRA's; far slower under Adam)")
    scaling: Literal["reference_rank", "current_rank"] = Field(
        "reference_rank", description="the r of alpha / r: the fixed reference rank `r`, or the current rank "
                                      "(every growth then shrinks the learned update by r_old / r_new)")
