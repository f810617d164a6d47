"""The training loop: one explicit pass from config to a trained, saved adapter.

Order matters and is the design: validate the run dir, load tokenizer and data (so bad data
fails before a model loads), load the model, wrap it with the adapter, build the optimizer,
let accelerate prepare both, then loop. Methods talk to the loop only through `MethodHooks`
(extra loss terms, a step hook that may add parameters, state for resume) and optimizers only
through their `OptimizerSpec` flags and `wants_create_graph`.
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

import adapters
import optim
from trainer import checkpoint
from trainer.config import Config, save_config
from trainer.data import build_datasets
from trainer.distributed import is_deepspeed, make_accelerator, micro_batch_context
from trainer.errors import UserError
from trainer.evaluate import evaluate, sample_answers
from trainer.export import save_final
from trainer.models import load_model, load_tokenizer
from trainer.rundir import plan_run_dir
from trainer.sampling import MicroBatchStream
from trainer.schedule import lr_factor
from trainer.tasks import TASKS
from trainer.tracking import Tracker
from trainer.validate import check_runtime


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


def train(cfg: Config) -> Path:
    """Run the job described by `cfg`; returns the run directory."""
    resume_from = plan_run_dir(cfg)
    accelerator = make_accelerator(cfg)
    check_runtime(cfg, accelerator)
    set_seed(cfg.train.seed)
    t = cfg.train
    run_dir = Path(t.output_dir)

    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = build_datasets(cfg.data, tokenizer, cfg.model.task, t.seed)
    task = TASKS[cfg.model.task](cfg, tokenizer)  # batches, loss, loss units, evaluation
    try:
        stream = MicroBatchStream(len(train_set), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
    except ValueError as e:
        raise UserError(f"too little training data: {e}", where=f"data.path={cfg.data.path}",
                        hint="add data or lower train.batch_size") from None
    model_cfg = cfg.model
    if optim.OPTIMIZERS[cfg.optim.name].double_backward and model_cfg.attn_implementation is None:
        # fused SDPA kernels have no double backward; eager attention does
        model_cfg = model_cfg.model_copy(update={"attn_implementation": "eager"})
    model = load_model(model_cfg, tokenizer)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    spec = adapters.ADAPTERS[cfg.adapter.type]
    try:
        model, hooks = spec.build(model, cfg.adapter, adapters.BuildContext(cfg.model.task, t.max_steps, t.seed))
    except (ValueError, NotImplementedError) as e:  # a method refusing this model or setting
        raise UserError(str(e).splitlines()[0], where=f"adapter.type={cfg.adapter.type}") from None

    state = {"step": 0, "wandb_id": None}
    if resume_from:
        state, method_state = checkpoint.read_state(resume_from)
        hooks.load_state_dict(method_state)  # may reshape the model (grown ranks) before weights load
    optimizer = build_optimizer(model, cfg, checkpoint.saved_group_names(resume_from) if resume_from else None)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from:
        checkpoint.load_checkpoint(accelerator, resume_from, model, optimizer)
        stream.load_state_dict(state["stream"])
    elif accelerator.is_main_process:  # a fresh run: only now, with everything loaded, touch the run dir
        if t.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")

    tracker = Tracker(accelerator, run_dir, cfg, state["step"], state["wandb_id"])
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.write(f"{len(train_set)} train / {len(eval_set)} eval examples; {n_params:,} trainable parameters"
                  + (f"; resuming from {resume_from.name}" if resume_from else ""))
    if t.sample_prompts and not resume_from:
        for q, a in zip(t.sample_prompts, sample_answers(accelerator, model, tokenizer, t.sample_prompts, t.max_new_tokens)):
            tracker.write(f"[before] {q} -> {a}")

    model.train()
    step, window_units, window_time = state["step"], 0, 0.0
    while step < t.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, t.max_steps, t.warmup_steps, t.lr_schedule)
        began = time.perf_counter()
        micro = [task.collate([train_set[i] for i in stream.next_indices()]) for _ in range(t.gradient_accumulation_steps)]
        # normalise by the loss units of the whole accumulated batch on all processes, so the
        # update does not depend on how the batch is split into micro-batches or processes;
        # counted on the host batches, so one process never waits on the GPU for it
        units = sum(task.units(mb) for mb in micro)
        if accelerator.num_processes > 1:
            units = int(accelerator.reduce(torch.tensor(units, device=accelerator.device), reduction="sum"))
        micro = [{k: v.to(accelerator.device) for k, v in mb.items()} for mb in micro]
        scale = accelerator.num_processes / max(units, 1)
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
                # over processes; `scale` already normalised by the global unit count
                # only ask for the gradient graph when the optimizer wants it (DeepSpeed's backward
                # takes no such argument; double-backward optimizers are refused under it anyway)
                accelerator.backward(total * t.gradient_accumulation_steps, **({"create_graph": True} if create_graph else {}))
                task_loss += loss.detach() / accelerator.num_processes
                for k, v in extras.items():
                    extra_totals[k] = extra_totals.get(k, 0.0) + v.detach() / len(micro)
                # drop the graph now: after a create_graph backward it would outlive the step
                del loss, total, extras
        grad_norm = _clip(accelerator, model, t.max_grad_norm)
        optimizer.step()
        step += 1
        new_params = hooks.after_optimizer_step(step, accelerator.unwrap_model(model))
        if new_params:
            add_method_params(getattr(optimizer, "optimizer", optimizer), new_params, cfg)
        optimizer.zero_grad(set_to_none=True)
        window_units += units
        window_time += time.perf_counter() - began
        tracker.advance()

        if step % t.log_every == 0 or step == t.max_steps:
            loss_value = float(accelerator.reduce(task_loss, reduction="sum"))
            row = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "epoch": round(stream.epoch, 4),
                   "tokens_per_s": window_units / max(window_time, 1e-9), "peak_rss_mb": _peak_rss_mb()}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row.update({k: float(v) for k, v in extra_totals.items()})
            row.update(hooks.metrics())
            tracker.log(step, row)
            window_units, window_time = 0, 0.0
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and eval_set:
            tracker.log(step, evaluate(accelerator, model, eval_set, task, t.batch_size, t.eval_batches))
        stopping = step == t.stop_after_steps and step < t.max_steps
        if (t.save_every and step % t.save_every == 0) or stopping:
            state = {"step": step, "stream": stream.state_dict(), "wandb_id": tracker.wandb_id}
            checkpoint.save_checkpoint(accelerator, run_dir, step, model, optimizer, state, hooks.state_dict(), t.keep_last)
        if stopping:
            tracker.write(f"stopped after step {step}; continue with train.resume=auto")
            tracker.close()
            return run_dir

    if eval_set:
        metrics = evaluate(accelerator, model, eval_set, task, t.batch_size, t.eval_batches)
        tracker.log(step, metrics)
        tracker.write("final " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    save_final(accelerator, model, tokenizer, cfg, run_dir)
    if t.sample_prompts:
        for q, a in zip(t.sample_prompts, sample_answers(accelerator, model, tokenizer, t.sample_prompts, t.max_new_tokens)):
            tracker.write(f"[after] {q} -> {a}")
    tracker.close()
    return run_dir


def _clip(accelerator, model, max_norm: float | None):
    """Clip (unless disabled) and return the pre-clip global gradient norm. It stays a tensor until
    it is logged: reading it here would make the host wait for the backward before the step."""
    if is_deepspeed(accelerator):  # DeepSpeed clips inside its step (config gradient_clipping)
        return model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
    params = [p for p in model.parameters() if p.grad is not None]
    return accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
