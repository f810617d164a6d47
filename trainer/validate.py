"""Combinations that cannot work, refused with one sentence before any model loads.

Config-only rules live in the config schema; these need the launch environment (accelerate
/ DeepSpeed config, mixed precision) and so run once the Accelerator exists.
"""
from __future__ import annotations

from accelerate.utils import DistributedType

import adapters
import optim
from trainer.distributed import is_zero3
from trainer.errors import UserError


def check_runtime(cfg, accelerator) -> None:
    opt = optim.OPTIMIZERS[cfg.optim.name]
    method = adapters.ADAPTERS[cfg.adapter.type]
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if opt.double_backward and accelerator.num_processes > 1:
        # DDP all-reduces the gradients in backward hooks, but the Hessian-vector products are taken
        # of the local gradient graph: each process would precondition with its own curvature
        raise UserError(f"{cfg.optim.name} differentiates the gradients a second time, and that graph does not pass "
                        f"through the gradient all-reduce of DDP or DeepSpeed, so its Hessian estimate would differ "
                        f"per process", where=cfg.where("optim.name"), hint="launch on one process (configs/accelerate/single.yaml)")
    if sharded and not opt.supports_zero:
        raise UserError(f"{cfg.optim.name} needs whole, unpartitioned gradients per parameter, which DeepSpeed ZeRO "
                        f"and FSDP shard", where=cfg.where("optim.name"),
                        hint="launch with configs/accelerate/single.yaml" + ("" if opt.double_backward else " or ddp-cpu.yaml"))
    partitioned = accelerator.distributed_type == DistributedType.FSDP or is_zero3(accelerator)
    if partitioned and method.no_partitioned_weights:
        raise UserError(f"{cfg.adapter.type} cannot train on weights partitioned across processes (DeepSpeed ZeRO-3, "
                        f"FSDP): {method.no_partitioned_weights}", where=cfg.where("adapter.type"),
                        hint="launch with configs/accelerate/ddp-cpu.yaml or single.yaml")
    if method.adds_parameters and accelerator.num_processes > 1:
        raise UserError(f"{cfg.adapter.type} adds parameters during training, which DDP's gradient sync and ZeRO's "
                        f"partitioning cannot take in after start-up", where=cfg.where("adapter.type"),
                        hint="launch on one process (configs/accelerate/single.yaml)")
    if opt.double_backward:
        if accelerator.mixed_precision == "fp16":
            raise UserError(f"{cfg.optim.name} differentiates gradients a second time, which fp16 loss scaling "
                            f"corrupts", where=cfg.where("optim.name"), hint="use bf16 or fp32 mixed precision")
        if cfg.model.attn_implementation not in (None, "eager"):
            raise UserError(f"{cfg.optim.name} needs a double-backward path; fused attention kernels "
                            f"({cfg.model.attn_implementation}) have none",
                            where=cfg.where("model.attn_implementation"), hint="leave it unset: eager attention is forced")
        if getattr(accelerator.state, "dynamo_plugin", None) and accelerator.state.dynamo_plugin.backend.value != "NO":
            raise UserError(f"{cfg.optim.name} is not supported under torch.compile (double backward)",
                            where="accelerate config dynamo_backend", hint="set dynamo_backend: 'NO'")
        if cfg.train.compile:
            raise UserError(f"{cfg.optim.name} is not supported under torch.compile (double backward)",
                            where=cfg.where("train.compile"), hint="set train.compile=false")
    if cfg.model.attn_implementation == "flash_attention_2" and not accelerator.device.type == "cuda":
        raise UserError("flash_attention_2 runs on CUDA GPUs only", where=cfg.where("model.attn_implementation"),
                        hint="leave it unset: packed batches get sdpa_varlen on the CPU")
