"""`adapter.type=none`: full fine-tuning of every parameter (the GaLore optimizers need it)."""
from __future__ import annotations

from typing import Literal

from adapters.base import AdapterOptions, AdapterSpec, BuildContext, MethodHooks, register_adapter


class FullOptions(AdapterOptions):
    type: Literal["none"] = "none"


def build_full(model, opts: FullOptions, ctx: BuildContext):
    model.requires_grad_(True)
    return model, MethodHooks()


register_adapter(AdapterSpec("none", FullOptions, build_full, kind="full"))
