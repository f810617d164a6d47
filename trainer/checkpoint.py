"""Atomic checkpoints and exact resume.

A checkpoint `checkpoints/step-N/` holds everything a resumed run needs to continue as if it had
never stopped: trainable weights (safetensors), optimizer state with its param-group layout,
method state (e.g. grown ranks), the data-stream position, every process's random generators
(Python, numpy, torch's CPU one and its accelerator device's), and the W&B run id. It is
written under `.tmp-step-N` and renamed into place, so a kill during a save leaves the previous
checkpoint untouched. Under DeepSpeed the engine writes weights and the partitioned optimizer
state itself (pickles), read back with `weights_only=True` (trainer/deepspeed_load.py).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
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


def rng_state(device: torch.device) -> dict:
    """This process's random generators: Python's, numpy's global one, torch's CPU one and, on an
    accelerator, the generator of the process's device (dropout on a GPU draws from that one).
    Only tensors, ints and floats, so `torch.load(weights_only=True)` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if device.type != "cpu":
        state["device"] = {"type": device.type, "state": torch.get_device_module(device.type).get_rng_state(device)}
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state`. A device generator is restored on the same kind of device only (a run
    moved between CPU and GPU cannot continue bit for bit anyway: the kernels differ)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["gauss"]))
    if device.type != "cpu" and state.get("device", {}).get("type") == device.type:
        torch.get_device_module(device.type).set_rng_state(state["device"]["state"], device)


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
    torch.save(rng_state(accelerator.device), tmp / f"rng-{rank}.pt")
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
        from trainer.deepspeed_load import weights_only_loads  # imports deepspeed: only when it runs
        weights_only_loads(model)  # DeepSpeed's own loader would unpickle anything
        model.load_checkpoint(str(ckpt), tag="engine", load_module_strict=False)
    else:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"])
    set_rng_state(torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=True), accelerator.device)
