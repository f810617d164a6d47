"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step-N/` holds everything a resumed run needs to continue as if it had
never stopped: trainable weights (safetensors), optimizer state with its param-group layout,
method state (e.g. grown ranks), the data-stream position, every process's RNG, and the W&B
run id. It is written under `.tmp-step-N` and renamed into place, so a kill during a save
leaves the previous checkpoint untouched. Under DeepSpeed the engine writes weights and the
partitioned optimizer state itself.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.distributed import gather_trainable, is_deepspeed

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first (temp dirs from interrupted saves are ignored)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, state: dict, method_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoints/step-<step> atomically on every process's behalf; returns its path."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    if is_deepspeed(accelerator):
        model.save_checkpoint(str(tmp), tag="engine", exclude_frozen_parameters=True)
    else:
        weights = gather_trainable(accelerator, model)
        if accelerator.is_main_process:
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "groups": _group_names(accelerator, model, optimizer)},
                       tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    if accelerator.is_main_process:
        torch.save(method_state, tmp / "method_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _group_names(accelerator, model, optimizer) -> list[dict]:
    """Parameter names per optimizer param group (and whether a method added the group
    mid-run), so a resumed run rebuilds the same layout."""
    by_id = {id(p): n for n, p in accelerator.unwrap_model(model).named_parameters()}
    return [{"names": [by_id[id(p)] for p in g["params"]], "added": bool(g.get("added_by_method"))}
            for g in optimizer.param_groups]


def read_state(ckpt: Path) -> tuple[dict, dict]:
    """(trainer state, method state) of a checkpoint: read before the optimizer is built."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    method_state = torch.load(ckpt / "method_state.pt", weights_only=True)
    return state, method_state


def saved_group_names(ckpt: Path) -> list[dict] | None:
    path = ckpt / "optimizer.pt"
    return torch.load(path, weights_only=True)["groups"] if path.exists() else None


def load_checkpoint(accelerator, ckpt: Path, model, optimizer) -> None:
    """Restore weights, optimizer and this process's RNG (call after accelerator.prepare)."""
    if is_deepspeed(accelerator):
        model.load_checkpoint(str(ckpt), tag="engine", load_module_strict=False)
    else:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"])
    rng = torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
