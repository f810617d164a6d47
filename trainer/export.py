"""Saving the trained result: the final adapter (peft format) and `train.py export`."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

import adapters
from trainer.data import labels
from trainer.distributed import gather_trainable, is_zero3
from trainer.errors import UserError


def save_final(accelerator, model, tokenizer, cfg, run_dir: Path, adapter_name: str | None = None) -> Path:
    """Write adapter/ (peft format) or, for full fine-tuning, model/; atomic, main process.
    `adapter_name` picks one adapter of a model that holds several (a co-served job's)."""
    spec = adapters.ADAPTERS[cfg.adapter.type]
    # ZeRO-3 partitions weights: every process joins the gather of the trainable ones
    state = gather_trainable(accelerator, model) if is_zero3(accelerator) else None
    out = run_dir / ("model" if spec.kind == "full" else "adapter")
    if accelerator.is_main_process:
        tmp = run_dir / f".tmp-{out.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if spec.save_adapter is not None:
            spec.save_adapter(unwrapped, str(tmp), state)
        else:
            selected = {"selected_adapters": [adapter_name]} if adapter_name else {}
            unwrapped.save_pretrained(str(tmp), state_dict=state, **selected)
        tokenizer.save_pretrained(str(tmp))
        if labels.of(cfg) is not None:  # peft's adapter files have no place for class names
            labels.save(labels.of(cfg), tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out


def export(run: str, out: str, merge: bool, overwrite: bool = False) -> Path:
    """Copy the run's adapter to `out`, or merge it into the base model and save that."""
    from peft import PeftModel

    from trainer.config import load_config
    from trainer.models import load_model, load_tokenizer

    run_dir, out_dir = Path(run), Path(out)
    if not (run_dir / "config.yaml").exists():
        raise UserError("no finished run here (config.yaml missing)", where=f"--run {run_dir}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError("already exists and is not empty", where=f"--out {out_dir}", hint="pass --overwrite or another --out")
    cfg = load_config(run_dir / "config.yaml")
    spec = adapters.ADAPTERS[cfg.adapter.type]
    trained = run_dir / ("model" if spec.kind == "full" else "adapter")
    if not trained.exists():
        raise UserError(f"the run has no {trained.name}/ (did it finish?)", where=f"--run {run_dir}")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if spec.kind == "full" or not merge:
        shutil.copytree(trained, tmp)
    else:
        tokenizer = load_tokenizer(cfg.model)
        classes = labels.of(cfg)
        base = load_model(cfg.model, tokenizer, classes.id2label() if classes else None)
        try:
            merged = PeftModel.from_pretrained(base, str(trained)).merge_and_unload()
        except adapters.NotMergeableError as e:  # non-linear adapters (IAA, bottleneck) have no weight update
            raise UserError(f"{cfg.adapter.type} cannot be merged: {e}".splitlines()[0], where="--merge",
                            hint="export without --merge and load the adapter with PeftModel.from_pretrained") from None
        merged.config.use_cache = True  # load_model turns the KV cache off for training only
        with torch.no_grad():
            merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "peftforge_export.yaml").write_text(yaml.safe_dump({"run": str(run_dir), "adapter": cfg.adapter.type}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir
