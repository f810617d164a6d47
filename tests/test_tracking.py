"""W&B (offline, the real library) gets the resolved config and the metrics; a resumed run
continues the same W&B run."""
from __future__ import annotations

import re

from cli_runner import TINY, run_inprocess

ARGS = ["tracking.wandb=true", "train.max_steps=4", "train.save_every=2", "train.eval_batches=1",
        "data.max_length=32", "tracking.project=peftforge-test"]


def test_wandb_offline_logs_config_and_resume_continues_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "train.stop_after_steps=2", *ARGS) == 0
    assert run_inprocess("--config", TINY, f"train.output_dir={out}", "train.resume=auto", *ARGS) == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    # offline-run-<date>_<time>-<run id>, and wandb appends -1 to the second folder when both
    # processes started within the same second
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)(-\d+)?", r.name).group(1) for r in runs}
    assert len(ids) == 1  # the second process resumed the first run's id
    # the run log (protobuf records) holds the resolved config and the logged metric names
    first = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needle in (b"gradient_accumulation_steps", b"tiny:llama", b"peftforge-test", b"grad_norm", b"tokens_per_s"):
        assert needle in first, needle
    assert b"eval/loss" in next(runs[1].glob("run-*.wandb")).read_bytes()
