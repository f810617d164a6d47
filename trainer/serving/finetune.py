"""A fine-tuning job that the serving engine advances in small units between inference batches.

It is the trainer's own job: `trainer.job` builds its parts (data, task, optimizer) and takes its
optimizer steps (LR schedule, loss normalisation by the step's loss units, clipping, method hook),
`trainer.loop` opens its run directory and writes its checkpoints, and `trainer.export` its final
adapter, so a co-served run directory is a `train.py` run directory (`train.resume=auto` resumes it
either way). What differs is only how a step's gradients are computed: micro-batch by micro-batch,
in token chunks (`chunked.ChunkedSequence`), each chunk a unit the scheduler places in an iteration.
The result equals `train.py`'s step (tests/test_serving_finetune.py).

Units (`pending()` says which is next): "forward" n positions of the current micro-batch's rows,
"backward" its last forwarded chunk, "step" the optimizer step once every micro-batch of the step is
through.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import set_seed

import optim
from trainer.config import Config
from trainer.distributed import make_accelerator
from trainer.errors import UserError
from trainer.export import save_final
from trainer.job import build_job, finish_step, load_data, set_step_lr, step_units
from trainer.loop import micro_batch_stream, open_run, save_run_checkpoint
from trainer.rundir import plan_run_dir
from trainer.serving import lora
from trainer.serving.chunked import ChunkedSequence
from trainer.serving.scheduler import Pending

log = logging.getLogger(__name__)


def check_coservable(cfg: Config) -> None:
    """Refuse, with one sentence, what cannot train beside serving."""
    a = cfg.adapter
    if cfg.model.task != "causal_lm":
        raise UserError("co-served fine-tuning trains causal LMs (the served model generates)", where="model.task")
    if a.type != "lora":
        raise UserError(f"co-served fine-tuning trains LoRA adapters only (peft mixes only LoRA per batch row), "
                        f"not {a.type}", where="adapter.type")
    if a.bias != "none":
        raise UserError("a trained bias is shared by every served adapter and the base model", where="adapter.bias",
                        hint="set adapter.bias=none")
    if a.init in ("pissa", "olora"):
        raise UserError(f"init={a.init} rewrites the base weights that every served model shares", where="adapter.init",
                        hint="use adapter.init=default or gaussian")
    if cfg.data.packing:
        raise UserError("packed rows cannot be chunked through a KV cache (the block mask needs the whole row)",
                        where="data.packing", hint="set data.packing=false")
    if cfg.train.gradient_checkpointing:
        raise UserError("gradient checkpointing drops the KV cache that chunked fine-tuning needs",
                        where="train.gradient_checkpointing")
    if optim.OPTIMIZERS[cfg.optim.name].double_backward:
        raise UserError(f"{cfg.optim.name} needs a second backward through the whole step", where="optim.name")


@dataclass
class Prepared:
    """What is read before the job touches the model (off the engine thread: it may take seconds)."""
    cfg: Config
    tokenizer: object
    train_set: list[dict]
    eval_set: list[dict]
    resume_from: Path | None


def prepare(cfg: Config, tokenizer) -> Prepared:
    check_coservable(cfg)
    resume_from = plan_run_dir(cfg)
    train_set, eval_set = load_data(cfg, tokenizer)
    return Prepared(cfg, tokenizer, train_set, eval_set, resume_from)


def row_groups(rows: list[int], lengths: list[int], cap: int | None) -> list[list[int]]:
    """`rows` in groups of at most `cap` real tokens (a longer row alone), by length so that a group
    holds little padding; one group of all rows when `cap` is None."""
    if cap is None:
        return [rows] if rows else []
    groups: list[list[int]] = []
    for r in sorted(rows, key=lambda r: lengths[r]):
        if groups and sum(lengths[g] for g in groups[-1]) + lengths[r] <= cap:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


class CoservedJob:
    """Built on the engine thread (it adds the trainee adapter to the served model)."""

    def __init__(self, prepared: Prepared, model, *, on_publish: Callable[[int], None],
                 on_event: Callable[[str, dict | None], None], clock: Callable[[], float] = time.perf_counter,
                 job_id: str = ""):
        cfg = self.cfg = prepared.cfg
        self.job_id = job_id
        self.on_publish, self.on_event, self.clock = on_publish, on_event, clock
        self.run_dir = Path(cfg.train.output_dir)
        accelerator = make_accelerator(cfg)
        if accelerator.num_processes > 1:
            raise UserError("a co-served job trains in the serving process", where="launch",
                            hint="start train.py serve with python, not accelerate launch")
        set_seed(cfg.train.seed)  # as train.py: the adapter's initial weights come from this seed
        model, hooks = lora.attach_trainee(model, cfg)
        self.job = build_job(cfg, accelerator, tokenizer=prepared.tokenizer,
                             data=(prepared.train_set, prepared.eval_set), resume_from=prepared.resume_from,
                             trainable=(model, hooks))
        self.model = self.job.trainable_model
        self.stream = micro_batch_stream(cfg, len(prepared.train_set), accelerator)
        state, self.tracker = open_run(cfg, accelerator, prepared.resume_from, self.stream)
        self.step = self.saved_step = state["step"]
        self.status = "running" if self.step < cfg.train.max_steps else "finishing"
        self.error: str | None = None
        self.trained_tokens = 0
        self.groups = 0  # row groups the micro-batches went through the engine in
        # dropout acts only in train mode; serving needs eval mode, so toggle around training forwards
        self._train_mode = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules())
        self._samples: deque = deque()
        self._current: ChunkedSequence | None = None
        self._in_step = False
        self._stream_at_step_start = self.stream.state_dict()
        self._step_began = 0.0
        self._step_loss = 0.0
        self._step_units = 0
        self._step_tokens = 0
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.on_event(f"{len(prepared.train_set)} training examples, {n_params:,} trainable parameters"
                      + (f", resuming after step {self.step}" if prepared.resume_from else ""), None)

    # ---- what the scheduler asks --------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ("running", "finishing")

    def pending(self) -> Pending | None:
        if not self.active:
            return None
        if self.status == "finishing":
            return Pending("step")
        while self._current is None or self._current.done:
            self._current = None
            if self._samples:
                ids, labels, lengths = self._samples.popleft()
                batch = self._batch(ids, labels, lengths)
                self._current = ChunkedSequence(
                    self.model, ids, labels, 1.0 / max(self._step_units, 1), lengths,
                    whole=lambda batch=batch: self.job.task.forward_loss(self.model, batch)[1],
                    head_rows=self.job.task.loss_chunk_rows(self.model, batch))
            elif self._in_step:
                return Pending("step")
            else:
                self._begin_step()
        current = self._current
        if current.to_forward:
            return Pending("forward", current.to_forward, current.position, current.rows)
        tokens, past = current.next_backward
        return Pending("backward", tokens, past, current.rows)

    def run(self, kind: str, tokens: int = 0) -> None:
        """Run one unit (`tokens`: positions of every row, for a forward); a forward adds its real
        (not padding) tokens to `trained_tokens`."""
        if kind == "forward":
            self._forward(tokens)
        elif kind == "backward":
            self._current.backward()
        else:
            self._optimizer_step()

    # ---- units ----------------------------------------------------------------------------
    def _begin_step(self) -> None:
        t = self.cfg.train
        self._stream_at_step_start = self.stream.state_dict()
        micro = [self.job.task.collate([self.job.train_set[i] for i in self.stream.next_indices()])
                 for _ in range(t.gradient_accumulation_steps)]
        set_step_lr(self.job, self.step)
        self._step_units = step_units(self.job, micro)
        for mb in micro:  # right-padded rows: each row's real tokens are its first mask.sum() positions
            lengths = [int(n) for n in mb["attention_mask"].sum(1)]
            # a row without loss tokens adds nothing to the gradient
            keep = [r for r, n in enumerate(lengths) if (mb["labels"][r, 1:n] != -100).any()]
            # the loss is a sum over rows, so groups of rows give the micro-batch's gradient exactly
            for group in row_groups(keep, lengths, self.cfg.serving.ft_group_tokens):
                self.groups += 1
                width = max(lengths[r] for r in group)  # a group's rows go through the chunks together
                self._samples.append((mb["input_ids"][group, :width], mb["labels"][group, :width],
                                      [lengths[r] for r in group]))
        self._in_step, self._step_loss, self._step_tokens = True, 0.0, 0
        self._step_began = self.clock()

    @staticmethod
    def _batch(ids: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> dict:
        """Right-padded rows as the loop's collator gives them: what the task's loss takes (a unit
        that covers the rows whole runs `forward_loss` on it, as `train_step` does)."""
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _forward(self, tokens: int) -> None:
        current = self._current
        if self._train_mode:
            self.model.train()
        try:
            done = current.forward(tokens)
        finally:
            if self._train_mode:
                self.model.eval()
        self._step_tokens += done
        self.trained_tokens += done
        if not current.to_forward:
            self._step_loss += current.loss_sum

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        if self.status == "finishing":  # resumed at max_steps: only the final save is left
            self._finish()
            return
        grad_norm = finish_step(self.job, self.step)
        self.step += 1
        self._in_step = False
        elapsed = self.clock() - self._step_began
        loss = self._step_loss / max(self._step_units, 1)
        row = {"loss": loss, "lr": self.job.optimizer.param_groups[0]["lr"], "epoch": round(self.stream.epoch, 4),
               "tokens_per_s": self._step_units / max(elapsed, 1e-9), "grad_norm": float(grad_norm)}
        self.tracker.log(self.step, row)
        self.tracker.advance()
        self.on_event(f"step {self.step}/{t.max_steps}: training loss={loss:.4f}", {"step": self.step, **row})
        if self.step % self.cfg.serving.publish_every == 0 or self.step == t.max_steps:
            self.on_publish(self.step)
        if t.save_every and self.step % t.save_every == 0:
            self._checkpoint()
        if self.step == t.max_steps:
            self._finish()
        elif self.step == t.stop_after_steps:
            self._checkpoint()
            self._end("cancelled", f"stopped after step {self.step} (train.stop_after_steps); "
                      f"restart with train.resume=auto to continue")

    def _finish(self) -> None:
        save_final(self.job.accelerator, self.model, self.job.tokenizer, self.cfg, self.run_dir,
                   adapter_name=lora.TRAINEE)
        if self.status == "finishing":
            self.on_publish(self.step)
        self._end("succeeded", f"saved the adapter to {self.run_dir / 'adapter'}")

    # ---- ending -----------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Checkpoint the last completed step; the step in progress (if any) is redone on resume."""
        if self.step == self.saved_step:
            return
        stream_state = self._stream_at_step_start if self._in_step else self.stream.state_dict()
        save_run_checkpoint(self.job, self.run_dir, self.step, stream_state, self.tracker)
        self.saved_step = self.step

    def _drop_step_in_progress(self) -> None:
        """Forget the step in progress, its gradients and its data: the data position goes back to
        the step's start, so a checkpoint taken now redoes that step on resume."""
        if self._in_step:
            self.stream.load_state_dict(self._stream_at_step_start)
        self._current, self._in_step = None, False
        self._samples.clear()
        self.job.optimizer.zero_grad(set_to_none=True)

    def interrupt(self, status: str, message: str) -> None:
        """Stop the job (shutdown, cancel): keep a resumable checkpoint of its last completed step."""
        if not self.active:
            return
        self._drop_step_in_progress()
        if self.status == "running":
            self._checkpoint()
        self._end(status, message)

    def fail(self, message: str) -> None:
        if self.active:
            self._drop_step_in_progress()
            self.error = message
            self._end("failed", message)

    def _end(self, status: str, message: str) -> None:
        self.status = status
        self.tracker.close()
        self.on_event(message, None)
