"""Adapter registry: the names users write in `adapter.type`.

Importing this package registers every method (and, for our own tuners, registers them with
peft so `PeftModel.from_pretrained` can load their saved adapters).
"""
from adapters.base import (ADAPTERS, AdapterOptions, AdapterSpec, BuildContext, MethodHooks, NotMergeableError,
                           register_adapter)
from adapters import adalora, balora, bitfit, bottleneck, full, ia3, iaa, lora, prefix, triadaptlora  # noqa: F401  (each registers itself)

__all__ = ["ADAPTERS", "AdapterOptions", "AdapterSpec", "BuildContext", "MethodHooks", "NotMergeableError",
           "register_adapter"]
