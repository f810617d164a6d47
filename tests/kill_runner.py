"""`python tests/kill_runner.py POINT STEP train.py-args...`: train.py, except that the process
sends itself SIGKILL at POINT inside the checkpoint save of step STEP (no cleanup runs, buffered
writes are lost, exactly as when the machine kills it). The points:

  weights    after the weights file was half written
  optimizer  after the optimizer state was half written
  rename     with the checkpoint complete in its temp dir, before the rename that publishes it
  prune      after the rename, half-way through deleting the checkpoint that keep_last drops
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

import trainer.checkpoint as ckpt
from trainer.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(path) -> None:
    path = Path(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    die()


def arm(point: str, step: int) -> None:
    saving = f"step-{step}"

    def in_save(path) -> bool:  # a file of the step's directory while it is written (.tmp-step-N)
        return Path(path).parent.name in (f".tmp-{saving}", saving)

    if point == "weights":
        real_save_file = ckpt.save_file

        def save_file(tensors, path, *args, **kwargs):
            real_save_file(tensors, path, *args, **kwargs)
            if in_save(path):
                half_written(path)
        ckpt.save_file = save_file
    elif point == "optimizer":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if in_save(path) and Path(path).name == "optimizer.pt":
                half_written(path)
        torch.save = save
    elif point == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(src).name == f".tmp-{saving}":
                die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    elif point == "prune":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            done = path.parent / f"step-{step}"
            if path.name.startswith("step-") and path != done and done.is_dir() and path.is_dir():
                (path / "trainable.safetensors").unlink()  # rmtree got this far
                die()
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
