"""Launch-mode plumbing: one process, DDP, or DeepSpeed ZeRO, chosen by the accelerate config only.

What it takes on a CPU machine (found with scripts/scaleout_probe.py; see docs/scale-out.md):
DDP needs `cpu=True` (else accelerate sees no distribution), multi-process CPU runs need the gloo
backend (else every DeepSpeed rank thinks it is rank 0), and DeepSpeed's "auto" sizes must be
filled from our config because the loop hands accelerate no dataloader.
"""
from __future__ import annotations

import importlib
import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory op (g++ + ninja, about a minute) that
    only inference all-reduce uses; training collectives go through gloo, so skip the build."""
    if torch.cuda.is_available() or _env_flag("PEFTFORGE_DS_SHM_BUILD"):
        return
    # importlib: `deepspeed.comm.torch` as an attribute is the torch module, not the submodule
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def make_accelerator(cfg) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if use_deepspeed:
        skip_deepspeed_shm_build()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and multi else []
    accelerator = Accelerator(cpu=on_cpu and not use_deepspeed, kwargs_handlers=handlers,
                              gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                              log_with="wandb" if cfg.tracking.wandb else None)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:  # no dataloader is prepared, so DeepSpeed's "auto" sizes come from our config
        t = cfg.train
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        ds.deepspeed_config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
        ds.deepspeed_config["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        ds.deepspeed_config["gradient_clipping"] = t.max_grad_norm or 0.0  # "auto" would mean 1.0
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def micro_batch_context(accelerator, model, last: bool):
    """Gradients sync (DDP all-reduce, DeepSpeed engine step) only on the last micro-batch."""
    accelerator.sync_gradients = last
    return nullcontext() if last else accelerator.no_sync(model)


def gather_trainable(accelerator, model) -> dict[str, torch.Tensor]:
    """Trainable weights by name on CPU. ZeRO-3 partitions them across processes, so every
    process joins the gather (only the trainable ones: not the whole base model)."""
    unwrapped = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    if not is_zero3(accelerator):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}
    import deepspeed
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}
