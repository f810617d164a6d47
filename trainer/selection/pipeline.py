"""`train.py pipeline`: select -> warm up on the selection -> fine-tune from the warmed-up weights,
from one config. Each stage has its own folder under `train.output_dir` and runs the real trainer
(`trainer.loop.train`) with stage overrides; a rerun of the same command skips finished stages and
resumes an interrupted one from its last checkpoint (`train.save_every`).

    <train.output_dir>/select/        selected.jsonl, selection.json, selection.png
    <train.output_dir>/warmup/        a training run: causal LM on the selection (text), epochs over it
    <train.output_dir>/warmed-model/  base + warm-up adapter merged (a full warm-up uses warmup/model/)
    <train.output_dir>/finetune/      a training run on data.path from the warmed-up weights
    <train.output_dir>/pipeline.json  the stages, their folders, status and wall time
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import adapters
from trainer.config import load_config
from trainer.errors import UserError
from trainer.selection.select import finished as selection_finished
from trainer.selection.select import select


# A stage's saved config holds the stage overrides' effect, not their list: resuming a warm-up that
# was stopped by `selection.warmup.overrides=[train.stop_after_steps=2]` without that override is
# the same run (the resume check compares whole configs; a changed selection is refused earlier,
# by the select stage).
NO_STAGE_OVERRIDES = ["selection.warmup.overrides=[]", "selection.finetune.overrides=[]"]


class Stopped(Exception):
    """A training stage stopped resumably (train.stop_after_steps) before its last step."""


def run_pipeline(config_path: str | None, overrides: list[str], overwrite: bool = False) -> Path:
    """Run (or continue) every stage; returns `train.output_dir`. Raises Stopped when a training
    stage stopped at a checkpoint before its end (rerun the same command to continue)."""
    cfg = load_config(config_path, overrides)
    root = Path(cfg.train.output_dir)
    if root.exists() and not root.is_dir():
        raise UserError("is a file, not a directory", where=f"train.output_dir={root}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the pipeline runs as one process", where="train.py pipeline",
                        hint="run it with python, or launch `train.py select` and each training stage separately")
    sel_dir = Path(cfg.selection.output_dir) if cfg.selection.output_dir else root / "select"
    record = _Record(root)

    # 1. select
    with record.stage("select", sel_dir) as stage:
        if overwrite or not selection_finished(sel_dir, cfg):
            cfg.selection.overwrite = cfg.selection.overwrite or overwrite
            select(cfg, sel_dir)
        else:
            stage.skipped()
    selected = sel_dir / "selected.jsonl"

    # 2. warm up: causal LM on the selection, `epochs` passes, the same model/adapter/optimizer
    warm_dir = root / "warmup"
    n_rows = sum(1 for line in selected.open(encoding="utf-8") if line.strip())
    stage_overrides = [f"data.path={selected}", "data.format=text", "data.eval_path=null", "data.eval_fraction=0",
                       "data.packing=false", "data.max_examples=null", f"train.output_dir={warm_dir}",
                       "train.sample_prompts=[]", *_run_name(cfg, "warmup"), *NO_STAGE_OVERRIDES]
    user = list(cfg.selection.warmup.overrides)
    warm_cfg = load_config(config_path, overrides + stage_overrides + user)
    if not any(o.split("=", 1)[0] == "train.max_steps" for o in user):
        per_step = warm_cfg.train.batch_size * warm_cfg.train.gradient_accumulation_steps
        steps = max(1, math.ceil(cfg.selection.warmup.epochs * n_rows / per_step))
        warm_cfg = load_config(config_path, overrides + stage_overrides + [f"train.max_steps={steps}"] + user)
    _check_causal(warm_cfg)
    with record.stage("warmup", warm_dir) as stage:
        _train_stage(warm_cfg, overwrite, stage)

    # 3. the warmed-up weights as a plain model folder
    full = adapters.ADAPTERS[warm_cfg.adapter.type].kind == "full"
    warmed = warm_dir / "model" if full else root / "warmed-model"
    with record.stage("merge", warmed) as stage:
        if full:
            stage.skipped()
        elif overwrite or not warmed.is_dir():
            from trainer.export import export
            export(str(warm_dir), str(warmed), merge=True, overwrite=True)
        else:
            stage.skipped()

    # 4. fine-tune on the target task from the warmed-up weights
    tune_dir = root / "finetune"
    tune_cfg = load_config(config_path, overrides + [f"model.name_or_path={warmed}", f"train.output_dir={tune_dir}",
                                                     *_run_name(cfg, "finetune"), *NO_STAGE_OVERRIDES]
                           + list(cfg.selection.finetune.overrides))
    with record.stage("finetune", tune_dir) as stage:
        _train_stage(tune_cfg, overwrite, stage)
    return root


def _run_name(cfg, stage: str) -> list[str]:
    return [f"tracking.run_name={cfg.tracking.run_name}-{stage}"] if cfg.tracking.run_name else []


def _check_causal(cfg) -> None:
    if cfg.model.task != "causal_lm":
        raise UserError(f"the warm-up trains a causal LM on the selected text; model.task is {cfg.model.task}",
                        where="model.task", hint="use a decoder model with model.task=causal_lm "
                        "(or selection.warmup.overrides to change the warm-up stage)")


def _train_stage(cfg, overwrite: bool, stage: "_Stage") -> None:
    """Train, resume, or skip a finished run (its final adapter/ or model/ exists)."""
    from trainer.loop import train
    from trainer.rundir import plan_run_dir

    run_dir = Path(cfg.train.output_dir)
    final = run_dir / ("model" if adapters.ADAPTERS[cfg.adapter.type].kind == "full" else "adapter")
    if overwrite:
        cfg.train.overwrite = True
    else:
        cfg.train.resume = "auto"
        if final.is_dir():
            plan_run_dir(cfg)  # refuses a finished run made with another model/data/adapter/optimizer
            stage.skipped()
            return
    _reset_accelerate()
    train(cfg)
    if not final.is_dir():
        stage.status = "stopped at a checkpoint"
        raise Stopped(f"{stage.name} stopped before its last step; rerun the same command to continue it")


def _reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a second training run in this process needs them fresh."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


class _Stage:
    def __init__(self, record: "_Record", name: str, folder: Path):
        self.record, self.name, self.folder, self.status = record, name, folder, "done"

    def skipped(self) -> None:
        self.status = "skipped (already done)"

    def __enter__(self) -> "_Stage":
        self.began = time.perf_counter()
        print(f"[pipeline] {self.name} -> {self.folder}", flush=True)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        status = self.status if kind in (None, Stopped) else f"failed: {kind.__name__}"
        self.record.save(self.name, {"folder": str(self.folder), "status": status,
                                     "seconds": round(time.perf_counter() - self.began, 2)})
        print(f"[pipeline] {self.name}: {status}", flush=True)


class _Record:
    """pipeline.json: what each stage did, written after each stage (atomically)."""

    def __init__(self, root: Path):
        self.path = root / "pipeline.json"

    def stage(self, name: str, folder: Path) -> _Stage:
        return _Stage(self, name, folder)

    def save(self, name: str, entry: dict) -> None:
        if not self.path.parent.is_dir():  # a stage failed before anything was created: write nothing
            return
        data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        data["stages"][name] = entry
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)
