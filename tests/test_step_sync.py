"""The optimizer step reads no tensor back to the host, with several processes too (the README
says so): a read makes the host wait for the device on a GPU, once per step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import ROOT, TINY, losses, run_inprocess

PROBE = Path(__file__).with_name("step_sync_probe.py")


@pytest.mark.slow
def test_two_process_step_reads_nothing_back_and_matches_one_process(tmp_path):
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "ddp")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(path.read_text()) for path in sorted((tmp_path / "ddp").glob("rank-*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["reads"] == [] for r in rows), rows
    # the same global batch (2 processes x 2 examples x 2 accumulation steps) on one process
    one = tmp_path / "one"
    assert run_inprocess("--config", TINY, f"train.output_dir={one}", "train.batch_size=4",
                         "train.gradient_accumulation_steps=2", "data.max_length=32", "data.max_examples=16",
                         "train.max_steps=1", "train.eval_batches=1") == 0
    assert rows[0]["loss"] == pytest.approx(losses(one)[1], abs=1e-5)
