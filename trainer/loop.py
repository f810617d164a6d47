"""The training loop: one explicit pass from config to a trained, saved adapter.

The job's parts and its optimizer step live in trainer.job (shared with federated clients and
co-served fine-tuning); this file is the run around them: the run directory, the data order,
resume, logging, evaluation, checkpoints and the final save.
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from accelerate.utils import set_seed

from trainer import checkpoint
from trainer.config import Config, save_config
from trainer.data import labels
from trainer.distributed import make_accelerator
from trainer.errors import UserError
from trainer.evaluate import evaluate, sample_answers
from trainer.export import save_final
from trainer.job import build_job, load_data, train_step
from trainer.models import load_tokenizer
from trainer.rundir import plan_run_dir
from trainer.sampling import MicroBatchStream
from trainer.tracking import Tracker
from trainer.validate import check_runtime


def train(cfg: Config) -> Path:
    """Run the job described by `cfg`; returns the run directory."""
    cfg = labels.resolve(cfg)  # the classes are part of the run's config, compared on resume
    resume_from = plan_run_dir(cfg)
    accelerator = make_accelerator(cfg)
    check_runtime(cfg, accelerator)
    set_seed(cfg.train.seed)
    t = cfg.train
    run_dir = Path(t.output_dir)

    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = load_data(cfg, tokenizer)
    stream = micro_batch_stream(cfg, len(train_set), accelerator)
    job = build_job(cfg, accelerator, tokenizer=tokenizer, data=(train_set, eval_set), resume_from=resume_from)
    model, optimizer, task, hooks = job.model, job.optimizer, job.task, job.hooks
    state, tracker = open_run(cfg, accelerator, resume_from, stream)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.write(f"{len(train_set)} train / {len(eval_set)} eval examples; {n_params:,} trainable parameters"
                  + (f"; resuming from {resume_from.name}" if resume_from else ""))
    if t.sample_prompts and not resume_from:
        for q, a in zip(t.sample_prompts, sample_answers(accelerator, model, tokenizer, t.sample_prompts, t.max_new_tokens)):
            tracker.write(f"[before] {q} -> {a}")

    if t.eval_at_start and eval_set and not resume_from:
        _report_eval(tracker, 0, evaluate(accelerator, model, eval_set, task, t.batch_size, t.eval_batches),
                     "before training:")
    model.train()
    step, window_units, window_time, noted = state["step"], 0, 0.0, 0
    while step < t.max_steps:
        began = time.perf_counter()
        micro = [task.collate([train_set[i] for i in stream.next_indices()]) for _ in range(t.gradient_accumulation_steps)]
        result = train_step(job, micro, step)
        for note in task.notes[noted:]:  # choices the task made on the first batch (loss path, attention)
            tracker.write(note)
        noted = len(task.notes)
        step += 1
        window_units += result.units
        window_time += time.perf_counter() - began
        tracker.advance()

        if step % t.log_every == 0 or step == t.max_steps:
            loss_value = float(accelerator.reduce(result.loss, reduction="sum"))
            row = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "epoch": round(stream.epoch, 4),
                   "tokens_per_s": float(window_units) / max(window_time, 1e-9), "peak_rss_mb": _peak_rss_mb()}
            if result.grad_norm is not None:
                row["grad_norm"] = float(result.grad_norm)
            row.update({k: float(v) for k, v in result.extras.items()})
            row.update(hooks.metrics())
            tracker.log(step, row)
            window_units, window_time = 0, 0.0
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and eval_set:
            _report_eval(tracker, step, evaluate(accelerator, model, eval_set, task, t.batch_size, t.eval_batches),
                         f"step {step}:")
        stopping = step == t.stop_after_steps and step < t.max_steps
        if (t.save_every and step % t.save_every == 0) or stopping:
            save_run_checkpoint(job, run_dir, step, stream.state_dict(), tracker)
        if stopping:
            tracker.write(f"stopped after step {step}; continue with train.resume=auto")
            tracker.close()
            return run_dir

    if eval_set:
        _report_eval(tracker, step, evaluate(accelerator, model, eval_set, task, t.batch_size, t.eval_batches),
                     "final")
    save_final(accelerator, model, tokenizer, cfg, run_dir)
    if t.sample_prompts:
        for q, a in zip(t.sample_prompts, sample_answers(accelerator, model, tokenizer, t.sample_prompts, t.max_new_tokens)):
            tracker.write(f"[after] {q} -> {a}")
    tracker.close()
    return run_dir


def _report_eval(tracker: Tracker, step: int, metrics: dict[str, float], when: str) -> None:
    """Held-out metrics into metrics.jsonl and W&B, and as one line above the progress bar."""
    tracker.log(step, metrics)
    tracker.write(f"{when} " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def micro_batch_stream(cfg: Config, n_examples: int, accelerator) -> MicroBatchStream:
    """This process's deterministic, resumable order of micro-batches over the training set."""
    t = cfg.train
    try:
        return MicroBatchStream(n_examples, t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
    except ValueError as e:
        raise UserError(f"too little training data: {e}", where=f"data.path={cfg.data.path}",
                        hint="add data or lower train.batch_size") from None


def open_run(cfg: Config, accelerator, resume_from: Path | None, stream: MicroBatchStream) -> tuple[dict, Tracker]:
    """Start or continue the run directory once every part of the job is loaded: the saved state
    (step, data position, W&B id) of a resumed run, or a fresh directory; the resolved config; the
    tracker. Returns (state, tracker)."""
    run_dir = Path(cfg.train.output_dir)
    state = {"step": 0, "wandb_id": None}
    if resume_from:
        state = checkpoint.read_state(resume_from)[0]
        stream.load_state_dict(state["stream"])
    elif accelerator.is_main_process:  # a fresh run: only now, with everything loaded, touch the run dir
        if cfg.train.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        if labels.of(cfg) is not None:
            labels.save(labels.of(cfg), run_dir)
    return state, Tracker(accelerator, run_dir, cfg, state["step"], state["wandb_id"])


def save_run_checkpoint(job, run_dir: Path, step: int, stream_state: dict, tracker: Tracker) -> Path:
    """A resumable checkpoint after `step` steps, with the data position `stream_state`."""
    state = {"step": step, "stream": stream_state, "wandb_id": tracker.wandb_id}
    return checkpoint.save_checkpoint(job.accelerator, run_dir, step, job.model, job.optimizer, state,
                                      job.hooks.state_dict(), job.cfg.train.keep_last)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
