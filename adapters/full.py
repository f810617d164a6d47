"""`adapter.type=none`: full fine-tuning of every parameter (the GaLore optimizers need it), or of
the parameters whose names match `trainable` (e.g. the last layers only)."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter


class FullOptions(AdapterOptions):
    type: Literal["none"] = "none"
    trainable: Optional[list[str]] = Field(None, description="regexes searched in parameter names; only matching "
                                           "parameters train (null: all), e.g. ['layers\\.(28|29)\\.']")

    @field_validator("trainable")
    @classmethod
    def _compiles(cls, patterns):
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression: {e}") from None
        return patterns


def build_full(model, opts: FullOptions, ctx: BuildContext):
    if opts.trainable is None:
        model.requires_grad_(True)
        return model, MethodHooks()
    chosen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(re.search(p, name) for p in opts.trainable))
        chosen += param.requires_grad
    if not chosen:
        raise ValueError(f"adapter.trainable {opts.trainable} matches no parameter name "
                         f"(e.g. {next(iter(dict(model.named_parameters())))})")
    return model, MethodHooks()


register_adapter(AdapterSpec("none", FullOptions, build_full, kind="full"))
