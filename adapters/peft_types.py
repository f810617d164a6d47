"""Registering peftforge's own tuners (TriAdaptLoRA, bottleneck, IAA) with peft.

peft only accepts a method whose name is a member of its `PeftType` enum and offers no public way
to add one (`register_peft_method` checks membership first), so `ensure_peft_type` adds the member
itself. Enum classes refuse new members after creation; `add_str_enum_member` writes the internal
tables that lookup by name and value, iteration, `in` and `len` consult. Those tables are CPython
internals: tests/test_peft_types.py runs it on every CPython that `requires-python` admits.
"""
from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_str_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add member `name` (value `name`) to the `(str, Enum)` class `enum_cls` unless it is there.

    Self-contained on purpose (no module-level names): the test ships its source to other
    interpreters."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    member.__objclass__ = enum_cls
    # the attribute goes in first: EnumType.__setattr__ refuses to rebind names of known members
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def ensure_peft_type(name: str) -> PeftType:
    """`PeftType[name]`, added first if peft does not know it (idempotent)."""
    return add_str_enum_member(PeftType, name)


def register_tuner(name: str, config_cls, model_cls) -> None:
    """Register a tuner with peft once (a module reload must not register it twice)."""
    if ensure_peft_type(name.upper()) not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
