"""The server's checkpoint after every round, in the trainer's conventions (trainer.checkpoint):
`checkpoints/step-<round>/` written under a temp name, fsynced and renamed, the last
`train.keep_last` kept, weights in safetensors, nothing unpickled but tensors.

It holds the global weights (`trainable.safetensors`, named as the model's trainable parameters),
Ferret's log of applied updates (`ferret_log.safetensors`: what a node that joins later must
replay), the round and W&B id (`trainer_state.json`) and the server's RNG (`rng-0.pt`).
Nodes keep nothing the server needs: after a resume every node is new to the server and is sent
the whole log (or, for FedAvg, the weights, as always).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import STATE_FILE, _fsync_tree, checkpoint_dirs
from trainer.federated import wire
from trainer.federated.ferret import Coded

WEIGHTS, LOG, RNG = "trainable.safetensors", "ferret_log.safetensors", "rng-0.pt"


def save_round(run_dir: Path, state, wandb_id: str | None, keep_last: int) -> Path:
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{state.round}", root / f".tmp-step-{state.round}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.clone() for k, v in state.travel.tensors(state.theta).items()}, str(tmp / WEIGHTS))
    if state.log:
        save_file(_log_tensors(state.log), str(tmp / LOG))
    (tmp / STATE_FILE).write_text(json.dumps({"round": state.round, "wandb_id": wandb_id, "federated": True}, indent=1))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / RNG)
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_round(ckpt: Path, state) -> str | None:
    """Restore `state` (weights, log, round) and the RNG from `ckpt`; returns the W&B id."""
    meta = json.loads((ckpt / STATE_FILE).read_text())
    if not meta.get("federated"):
        raise ValueError(f"{ckpt} is not a federated run's checkpoint")
    state.theta = state.travel.from_tensors(load_file(str(ckpt / WEIGHTS)))
    state.log = _log_entries(load_file(str(ckpt / LOG))) if (ckpt / LOG).exists() else []
    state.round = int(meta["round"])
    rng = torch.load(ckpt / RNG, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return meta.get("wandb_id")


def _log_tensors(entries: list[wire.LogEntry]) -> dict[str, torch.Tensor]:
    return {"rounds": torch.tensor([e.round for e in entries]), "clients": torch.tensor([e.client for e in entries]),
            "seeds": torch.tensor([e.coded.seed for e in entries]),
            "counts": torch.tensor([list(e.coded.counts) for e in entries]),
            "coeffs": torch.cat([e.coded.coeffs for e in entries])}


def _log_entries(t: dict[str, torch.Tensor]) -> list[wire.LogEntry]:
    entries, at = [], 0
    for rnd, client, seed, counts in zip(t["rounds"].tolist(), t["clients"].tolist(), t["seeds"].tolist(), t["counts"].tolist()):
        n = sum(counts)
        entries.append(wire.LogEntry(rnd, client, Coded(seed, tuple(counts), t["coeffs"][at:at + n].clone())))
        at += n
    return entries
