"""A crash during a save must leave the previous checkpoint usable, and resume from it exact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cli_runner import ROOT, TINY, losses, run_inprocess

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


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["train.max_steps=16", "train.save_every=1", "train.eval_batches=1", "data.max_length=32"]
    assert run_inprocess("--config", TINY, f"train.output_dir={straight}", *args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", TINY, f"train.output_dir={killed}",
                             *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "step-3").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_inprocess("--config", TINY, f"train.output_dir={killed}", "train.resume=auto", *args) == 0
    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)
