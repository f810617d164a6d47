"""The served model's adapters: one base model wrapped once by peft, holding every LoRA adapter
that serves (user adapters, published versions of fine-tuned ones) and the one being trained.

peft routes each row of a batch to its adapter (`adapter_names=`), but only in eval mode and not
from two threads at once, so the engine thread alone calls these. The adapter being trained is
always peft's `default` adapter: its parameter names are then exactly those of a run of
`train.py`, so a co-served job's checkpoints and final adapter are interchangeable with the
trainer's (resume one with the other).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import adapters
from adapters.lora import lora_config
from trainer.errors import UserError

TRAINEE = "default"
BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def is_peft(model) -> bool:
    return isinstance(model, PeftModel)


def adapter_kwargs(model, names: list[str]) -> dict:
    """The forward kwargs that route row i to adapter names[i] (none on a bare base model)."""
    if not is_peft(model):
        assert all(n == BASE for n in names), names
        return {}
    return {"adapter_names": names}


@contextmanager
def routed(model, names: list[str]):
    """Inside the block, a forward of `model` with the kwargs yielded sends row i to adapter
    names[i]. A batch of base-model rows only skips peft's per-row routing, which registers a hook
    on every adapted layer for each forward (+15% on a SmolLM2-135M decode step on this CPU): the
    adapted layers are switched off for the one call instead, through the flag their forward reads
    (peft's own `disable_adapter()` also re-sets requires_grad on every adapter and costs more)."""
    if not is_peft(model) or any(n != BASE for n in names):
        yield adapter_kwargs(model, names)
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m._disable_adapters]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield {}
    finally:
        for layer in layers:
            layer._disable_adapters = False


def check_lora_folder(path: str, where: str) -> PeftConfig:
    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"not a peft adapter folder: {' '.join(str(exc).split())[:200]}", where=where) from None
    if config.peft_type.value != "LORA" or getattr(config, "use_dora", False):
        raise UserError(f"only LoRA adapters can share a batch (peft mixes LoRA adapters per row), this is "
                        f"{'DoRA' if getattr(config, 'use_dora', False) else config.peft_type.value}", where=where)
    return config


def load_adapter(model, path: str, name: str, where: str):
    """Load a saved LoRA adapter under `name`, frozen; returns the (possibly newly wrapped) model."""
    check_lora_folder(path, where)
    if is_peft(model):
        model.load_adapter(path, adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
    freeze_all_but(model, None)
    model.eval()
    return model


def attach_trainee(model, cfg):
    """Add the job's LoRA adapter as `default`, trainable, active; returns (model, method hooks).

    On a bare base model this is the trainer's own adapter build (`adapters.ADAPTERS[...]`), on a
    model that already holds adapters it is peft's add_adapter with the same LoraConfig: both
    initialise the new weights from the global RNG in the same module order, so a seeded job
    starts from the same weights as under `train.py`."""
    ctx = adapters.BuildContext(cfg.model.task, cfg.train.max_steps, cfg.train.seed)
    if is_peft(model):
        model.add_adapter(TRAINEE, lora_config(cfg.adapter, ctx))
        hooks = adapters.MethodHooks()
    else:
        model, hooks = adapters.ADAPTERS[cfg.adapter.type].build(model, cfg.adapter, ctx)
    model.set_adapter(TRAINEE)  # active (a forward without adapter_names trains it) and trainable
    freeze_all_but(model, TRAINEE)
    model.eval()
    return model, hooks


def detach_trainee(model):
    """Drop the trained adapter (its published copies stay); a model left without adapters goes
    back to the bare base model."""
    if not is_peft(model) or TRAINEE not in model.peft_config:
        return model
    model.delete_adapter(TRAINEE)
    if not model.peft_config:
        return model.unload()
    freeze_all_but(model, None)
    return model


def add_slot(model, name: str) -> None:
    """A frozen adapter with the trainee's configuration, to hold a published copy of it."""
    config = copy.deepcopy(model.peft_config[TRAINEE])
    config.inference_mode = True
    model.add_adapter(name, config)
    model.set_adapter(TRAINEE)  # add_adapter leaves the active adapter alone, but be explicit
    freeze_all_but(model, TRAINEE)


@torch.no_grad()
def copy_adapter(model, source: str, target: str) -> None:
    """target's weights := source's (a published version: same shapes, same scaling)."""
    params = dict(model.named_parameters())
    copied = 0
    for name, param in params.items():
        parts = name.split(".")
        if source in parts:
            params[".".join(target if p == source else p for p in parts)].copy_(param)
            copied += 1
    assert copied, f"adapter {source!r} has no parameters"


def delete_adapter(model, name: str):
    model.delete_adapter(name)
    if not model.peft_config:
        return model.unload()
    freeze_all_but(model, TRAINEE if TRAINEE in model.peft_config else None)
    return model


def freeze_all_but(model, trainee: str | None) -> None:
    """Only the trainee's parameters require grad (peft makes an adapter trainable whenever it
    becomes active, e.g. when the active one is deleted)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainee is not None and trainee in name.split("."))


def adapter_names(model) -> list[str]:
    return list(model.peft_config) if is_peft(model) else []
