"""A training job's parts and its optimizer step, shared by every way peftforge trains.

`train.py` (trainer.loop), a federated client (trainer.federated) and a co-served fine-tuning job
(trainer.serving) all build their parts with `build_job` and advance them with `train_step`, so
data, tasks, adapters, optimizers and the loss normalisation exist once.

Order matters and is the design: tokenizer and data first (bad data fails before a model loads),
then the model, the adapter around it, the method state of a resumed run (it may reshape the
model), the optimizer over the trainable parameters, and accelerate's prepare of both.
Methods talk to the step only through `MethodHooks` (extra loss terms, a step hook that may add
parameters, state for resume) and optimizers only through their `OptimizerSpec` flags and
`wants_create_graph`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import adapters
import optim
from trainer import checkpoint
from trainer.compile import compile_layers
from trainer.config import Config
from trainer.data import build_datasets, labels
from trainer.distributed import is_deepspeed, micro_batch_context
from trainer.errors import UserError
from trainer.models import load_model, load_tokenizer
from trainer.schedule import lr_factor
from trainer.tasks import TASKS, Task
from trainer.varlen_attention import packed_attention


@dataclass
class Job:
    cfg: Config
    accelerator: Any
    tokenizer: Any
    task: Task
    train_set: list[dict]
    eval_set: list[dict]
    model: torch.nn.Module  # as prepared by accelerate (DDP / DeepSpeed engine / the module itself)
    hooks: adapters.MethodHooks
    optimizer: Any  # as prepared by accelerate

    @property
    def trainable_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


@dataclass
class StepResult:
    loss: torch.Tensor  # this process's share of the normalised task loss, still on the device
    extras: dict[str, torch.Tensor]  # method terms (reg/*), averaged over the micro-batches
    grad_norm: torch.Tensor | None  # pre-clip global norm; None where DeepSpeed does not report it
    # loss units (tokens, examples, queries) of the whole step on all processes: an int on one
    # process, a device tensor with several (read it only when logging)
    units: int | torch.Tensor


def load_data(cfg: Config, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples of `cfg.data` rendered for `cfg.model.task`, labels mapped as the
    resolved config names them."""
    cfg = labels.resolve(cfg)
    return build_datasets(cfg.data, tokenizer, cfg.model.task, cfg.train.seed, labels.of(cfg))


def load_trainable_model(cfg: Config, tokenizer, mixed_precision: str = "no") -> tuple[torch.nn.Module, adapters.MethodHooks]:
    """The base model wrapped by the configured adapter, and the method's hooks. `mixed_precision`
    (accelerate's: no, bf16, fp16) decides whether packed batches can use flash-attention."""
    model_cfg = cfg.model
    if optim.OPTIMIZERS[cfg.optim.name].double_backward and model_cfg.attn_implementation is None:
        # fused SDPA kernels have no double backward; eager attention does
        model_cfg = model_cfg.model_copy(update={"attn_implementation": "eager"})
    elif model_cfg.attn_implementation is None and model_cfg.task == "causal_lm" and (
            cfg.data.packing or cfg.train.padding_free):
        # packed rows, and padded ones run padding-free, want an attention that keeps documents apart
        model_cfg = model_cfg.model_copy(update={"attn_implementation": packed_attention(mixed_precision)})
    classes = labels.of(cfg)
    id2label = classes.id2label() if classes else None
    try:
        model = load_model(model_cfg, tokenizer, id2label)
    except UserError:
        if model_cfg is cfg.model or cfg.model.attn_implementation or model_cfg.attn_implementation == "eager":
            raise
        # a model class without transformers' attention interface refuses the per-document
        # attention we picked for it; it trains padded, with its own default attention
        model = load_model(cfg.model, tokenizer, id2label)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    spec = adapters.ADAPTERS[cfg.adapter.type]
    try:
        model, hooks = spec.build(model, cfg.adapter, adapters.BuildContext(cfg.model.task, cfg.train.max_steps, cfg.train.seed))
    except (ValueError, NotImplementedError) as e:  # a method refusing this model or setting
        raise UserError(str(e).splitlines()[0], where=cfg.where("adapter.type")) from None
    if cfg.train.compile:
        compile_layers(model)
    return model, hooks


def build_optimizer(model, cfg: Config, saved_groups: list[dict] | None):
    """The optimizer over trainable parameters. On resume it is rebuilt in the saved layout:
    the builder's groups over the same parameters in the same order, then the groups a method
    added mid-run (TriAdaptLoRA's grown ranks), so the saved state maps onto it."""
    spec = optim.OPTIMIZERS[cfg.optim.name]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved_groups is None:
        opt = spec.build(list(params.items()), cfg.optim)
    else:
        initial = [n for g in saved_groups if not g["added"] for n in g["names"]]
        opt = spec.build([(n, params[n]) for n in initial], cfg.optim)
        for g in saved_groups:
            if g["added"]:
                add_method_params(opt, [params[n] for n in g["names"]], cfg)
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
    return opt


def add_method_params(opt, new_params, cfg: Config) -> None:
    """Parameters a method created mid-run join the optimizer and the LR schedule."""
    opt.add_param_group({"params": list(new_params), "lr": cfg.optim.lr, "base_lr": cfg.optim.lr,
                         "weight_decay": cfg.optim.weight_decay, "added_by_method": True})


def build_job(cfg: Config, accelerator, *, tokenizer=None, data: tuple[list[dict], list[dict]] | None = None,
              resume_from: Path | None = None, trainable: tuple[torch.nn.Module, adapters.MethodHooks] | None = None) -> Job:
    """Every part of a job, prepared by accelerate. `data` replaces `cfg.data` (a federated
    client's partition); `resume_from` restores method state, weights, optimizer and RNG;
    `trainable` replaces loading the model and wrapping it (a co-served job attaches its adapter
    to the model that serves): its parameters that require grad are the ones trained.
    The job's config has its classification labels resolved (trainer.data.labels)."""
    cfg = labels.resolve(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    train_set, eval_set = data if data is not None else load_data(cfg, tokenizer)
    task = TASKS[cfg.model.task](cfg, tokenizer)  # batches, loss, loss units, evaluation
    model, hooks = trainable if trainable is not None else load_trainable_model(cfg, tokenizer, accelerator.mixed_precision)
    attention = getattr(model.config, "_attn_implementation", None)
    task.notes.append(f"attention: {attention}" + (", decoder layers compiled" if cfg.train.compile else ""))
    if resume_from:
        hooks.load_state_dict(checkpoint.read_state(resume_from)[1])  # may reshape the model (grown ranks)
    optimizer = build_optimizer(model, cfg, checkpoint.saved_group_names(resume_from) if resume_from else None)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from:
        checkpoint.load_checkpoint(accelerator, resume_from, model, optimizer)
    return Job(cfg, accelerator, tokenizer, task, train_set, eval_set, model, hooks, optimizer)


def train_step(job: Job, micro: list[dict], step: int) -> StepResult:
    """One optimizer step over the accumulated micro-batches `micro` (host tensors, one per
    accumulation step). `step` counts the steps done before this one: it places the step on the
    LR schedule and is passed on (+1) to the method's step hook."""
    cfg, accelerator, model, optimizer, task, hooks = job.cfg, job.accelerator, job.model, job.optimizer, job.task, job.hooks
    t = cfg.train
    set_step_lr(job, step)
    units = step_units(job, micro)
    scale = accelerator.num_processes / units.clamp(min=1) if torch.is_tensor(units) else 1 / max(units, 1)
    micro = [{k: v.to(accelerator.device) for k, v in mb.items()} for mb in micro]
    create_graph = optim.wants_create_graph(getattr(optimizer, "optimizer", optimizer))
    # accumulate as tensors: a float() per micro-batch would force a device sync each time
    task_loss, extra_totals = torch.zeros((), device=accelerator.device), {}
    for i, mb in enumerate(micro):
        with micro_batch_context(accelerator, model, last=i == len(micro) - 1):
            outputs, loss = task.forward_loss(model, mb)
            loss = loss * scale
            extras = hooks.extra_losses(mb, outputs, model)
            del outputs  # the logits are not needed by backward; free them before it runs
            total = loss + sum(extras.values()) / len(micro)
            # accelerate (or DeepSpeed) divides by the accumulation steps and DDP/ZeRO average
            # over processes; `scale` already normalised by the global unit count.
            # Only ask for the gradient graph when the optimizer wants it (DeepSpeed's backward
            # takes no such argument; double-backward optimizers are refused under it anyway)
            accelerator.backward(total * t.gradient_accumulation_steps, **({"create_graph": True} if create_graph else {}))
            task_loss += loss.detach() / accelerator.num_processes
            for k, v in extras.items():
                extra_totals[k] = extra_totals.get(k, 0.0) + v.detach() / len(micro)
            # drop the graph now: after a create_graph backward it would outlive the step
            del loss, total, extras
    grad_norm = finish_step(job, step)
    return StepResult(task_loss, extra_totals, grad_norm, units)


def set_step_lr(job: Job, step: int) -> None:
    """Place the step (0-based, steps done before it) on the LR schedule, in every param group."""
    t = job.cfg.train
    for group in job.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, t.max_steps, t.warmup_steps, t.lr_schedule)


def step_units(job: Job, micro: list[dict]):
    """Loss units of the whole accumulated batch on all processes: the step's loss is normalised
    by them, so the update does not depend on how the batch is split into micro-batches or
    processes. Counted on the host batches; with several processes the global count is summed on
    the device and stays there (a device tensor), so the host never waits for the collective."""
    accelerator = job.accelerator
    units = sum(job.task.units(mb) for mb in micro)
    if accelerator.num_processes > 1:
        units = accelerator.reduce(torch.tensor(units, device=accelerator.device), reduction="sum")
    return units


def finish_step(job: Job, step: int):
    """The step after its gradients are in: clip, optimizer step, the method's step hook (which
    may add parameters), zero the gradients. Returns the pre-clip gradient norm."""
    accelerator, model, optimizer, cfg = job.accelerator, job.model, job.optimizer, job.cfg
    grad_norm = _clip(accelerator, model, cfg.train.max_grad_norm)
    optimizer.step()
    new_params = job.hooks.after_optimizer_step(step + 1, accelerator.unwrap_model(model))
    if new_params:
        add_method_params(getattr(optimizer, "optimizer", optimizer), new_params, cfg)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _clip(accelerator, model, max_norm: float | None):
    """Clip (unless disabled) and return the pre-clip global gradient norm. It stays a tensor until
    it is logged: reading it here would make the host wait for the backward before the step."""
    if is_deepspeed(accelerator):  # DeepSpeed clips inside its step (config gradient_clipping)
        return model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
    params = [p for p in model.parameters() if p.grad is not None]
    return accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
