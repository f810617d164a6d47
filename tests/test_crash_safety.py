"""A crash during a save must leave the previous checkpoint usable, and resume from it exact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from cli_runner import ROOT, TINY, losses, metrics, run_inprocess
from trainer.checkpoint import checkpoint_dirs

COMMON = ["train.max_steps=8", "train.save_every=2", "train.keep_last=2", "train.eval_batches=1",
          "data.max_length=32", "train.gradient_accumulation_steps=2"]


class Crash(BaseException):
    """Stands for the process dying (not an Exception, so nothing catches it)."""


def test_crash_in_the_middle_of_a_save(tmp_path, monkeypatch):
    import trainer.checkpoint as ckpt
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert run_inprocess("--config", TINY, f"train.output_dir={straight}", *COMMON) == 0

    real_fsync = ckpt._fsync_tree

    def dying_fsync(root):  # the 3rd save dies after writing its files, before the rename
        if root.name == ".tmp-step-6":
            raise Crash
        real_fsync(root)

    monkeypatch.setattr(ckpt, "_fsync_tree", dying_fsync)
    with pytest.raises(Crash):
        run_inprocess("--config", TINY, f"train.output_dir={crashed}", *COMMON)
    monkeypatch.setattr(ckpt, "_fsync_tree", real_fsync)
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == [".tmp-step-6", "step-2", "step-4"]

    assert run_inprocess("--config", TINY, f"train.output_dir={crashed}", "train.resume=auto", *COMMON) == 0
    a, b = losses(straight), losses(crashed)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)


@pytest.fixture(scope="module")
def straight_6(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "straight"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", *KILL_ARGS) == 0
    return out


KILL_ARGS = ["train.max_steps=6", "train.save_every=2", "train.keep_last=1", "train.eval_batches=1",
             "data.max_length=32", "adapter.dropout=0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["weights", "rename", "prune"])  # kill_runner.py also has "optimizer"
def test_sigkill_inside_a_save_then_resume(tmp_path, straight_6, point):
    """A real SIGKILL at a chosen point inside the save of step 4 (tests/kill_runner.py); the run
    resumes from the last complete checkpoint (step 2, or step 4 once it was renamed into place)
    and logs every step once, with the losses of the uninterrupted run."""
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_runner.py"), point, "4", "--config", TINY,
                           f"train.output_dir={killed}", *KILL_ARGS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    complete = [p.name for p in checkpoint_dirs(killed) if (p / "trainable.safetensors").exists()]
    assert complete == (["step-4"] if point == "prune" else ["step-2"])
    assert run_inprocess("--config", TINY, f"train.output_dir={killed}", "train.resume=auto", *KILL_ARGS) == 0
    logged = [m["step"] for m in metrics(killed) if "loss" in m]
    assert logged == list(range(1, 7))  # nothing logged twice, nothing missing
    a, b = losses(straight_6), losses(killed)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
