"""Run train.py in-process (fast) or as a subprocess (for launches and exit codes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-lora.yaml")


def run_inprocess(*args: str) -> int:
    """trainer.cli.main with accelerate's process-wide singletons reset between runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from trainer.cli import main
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return main(list(args))


def run_subprocess(*args: str, launcher: list[str] | None = None, timeout: int = 600, env: dict | None = None):
    """`python train.py ARGS` (or `LAUNCHER train.py ARGS`); returns the CompletedProcess."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def assert_same_training(reference: Path, other: Path, steps: int) -> None:
    """Two runs of the same job took the same steps: each step's loss to 1e-5 and the final adapters.
    Adam divides by sqrt(v): float rounding in the smallest gradients moves such a weight by up to
    ~1e-5 after a few steps at lr 1e-2, which is why the weights get a looser bound than the losses."""
    import pytest
    import torch
    from safetensors.torch import load_file

    want, got = losses(reference), losses(other)
    assert want.keys() == got.keys() == set(range(1, steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    wa, wb = (load_file(Path(run) / "adapter" / "adapter_model.safetensors") for run in (reference, other))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=3e-5, rtol=1e-3)
