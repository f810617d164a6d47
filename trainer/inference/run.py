"""A finished run opened for use: checked first (cheaply, before anything loads), then its base
model with the trained adapter (or its fully trained model), tokenizer, task and classes.

Also what both commands share: the --data rows checked against the run's task, the --out file
(never overwritten without --overwrite, written whole or not at all), and a progress bar.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

import adapters
from trainer.checkpoint import latest_checkpoint
from trainer.config import Config, load_config
from trainer.data import labels, load_rows
from trainer.errors import UserError
from trainer.models import load_model, load_tokenizer
from trainer.tasks import TASKS

@dataclass
class Run:
    run_dir: Path
    cfg: Config  # the run's resolved config.yaml
    trained_dir: Path  # adapter/ (peft format) or model/ (full fine-tuning)

    @property
    def full(self) -> bool:
        return self.trained_dir.name == "model"

    @property
    def labels(self):
        """The run's classes (trainer.data.labels.LabelMap), or None for tasks without labels."""
        return labels.of(self.cfg)

    def tokenizer(self):
        return load_tokenizer(self.cfg.model)


@dataclass
class Loaded:
    run: Run
    accelerator: Any
    tokenizer: Any
    model: Any  # in eval mode, on the accelerator's device
    task: Any  # trainer.tasks.Task of the run's model.task

    @property
    def labels(self):
        return self.run.labels


def open_run(run: str) -> Run:
    """The run in `run`, checked: a directory with a config and a trained adapter or model."""
    run_dir = Path(run)
    where = f"--run {run}"
    if not run_dir.is_dir():
        raise UserError("no such run directory", where=where, hint="give the train.output_dir of a finished run")
    if not (run_dir / "config.yaml").is_file():
        raise UserError("not a run directory (it has no config.yaml)", where=where,
                        hint="give the train.output_dir of a finished run")
    cfg = load_config(run_dir / "config.yaml")
    trained = run_dir / ("model" if adapters.ADAPTERS[cfg.adapter.type].kind == "full" else "adapter")
    if not trained.is_dir():
        ckpt = latest_checkpoint(run_dir)
        hint = (f"it stopped after {ckpt.name}; finish it with train.resume=auto" if ckpt
                else "the run did not finish; train it to the end first")
        raise UserError(f"the run has no trained {trained.name}/", where=where, hint=hint)
    return Run(run_dir, cfg, trained)


def load(run: Run, tokenizer) -> Loaded:
    """The run's trained model as training left it, in eval mode, with its task."""
    cfg = run.cfg
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:  # every process would evaluate the whole data and write --out
        raise UserError("eval and predict run on one process", where="accelerate launch",
                        hint="run python train.py eval|predict ...")
    classes = run.labels
    id2label = classes.id2label() if classes is not None else None
    if run.full:
        model = load_model(cfg.model.model_copy(update={"name_or_path": str(run.trained_dir)}), tokenizer, id2label)
    else:
        with _quiet_transformers():  # its report of a newly initialised head: the adapter restores it
            base = load_model(cfg.model, tokenizer, id2label)
        model = PeftModel.from_pretrained(base, str(run.trained_dir))
    model = accelerator.prepare_model(model, evaluation_mode=True).eval()
    return Loaded(run, accelerator, tokenizer, model, TASKS[cfg.model.task](cfg, tokenizer))


@contextmanager
def _quiet_transformers():
    """transformers' warnings off for a while (a fresh classification head, trained in the adapter,
    is reported as "newly initialized ... consider training", which misleads a user evaluating it)."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def positive_int(text: str) -> int:
    """argparse type of --batch-size and the like."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def read_rows(path: str, task: str, columns: dict[str, tuple]) -> list[dict]:
    """The rows of --data `path`, refused in one line when the columns of its first row do not fit
    `task`: `columns[task]` is (a test of the column names, the columns a user is told to give)."""
    rows = load_rows(path, "--data")
    fits, needs = columns[task]
    found = set(rows[0])
    if not fits(found):
        raise UserError(f"its columns ({', '.join(sorted(found))}) do not fit this run's task {task}",
                        where=f"--data {path}", hint=f"{task} rows need {needs}")
    return rows


def check_out(out: str | None, overwrite: bool) -> None:
    """Refuse an --out that exists (unless --overwrite) or is a folder, before any work."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise UserError("is a folder; give a file name", where=f"--out {out}")
    if path.exists() and not overwrite:
        raise UserError("already exists", where=f"--out {out}", hint="pass --overwrite or another --out")


def write_out(out: str, text: str) -> None:
    """Write `text` to `out` whole: into a temp file beside it, then renamed over it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def forward_progress(model, total: int | None, desc: str):
    """A progress bar that advances with every forward call of `model` (batches, or pooled
    encodings for ranking tasks, whose count the task decides)."""
    bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)

    def advance(*_):  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    handle = model.register_forward_hook(advance)
    try:
        yield
    finally:
        handle.remove()
        bar.close()
