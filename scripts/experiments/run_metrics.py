"""The rows a training run logged: train.py writes one JSON object per line to <run_dir>/metrics.jsonl
(training steps and evaluations alike; an evaluation row holds eval/loss)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """Every logged row in order; [] for a run that has not logged yet."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def final_eval(run_dir: Path) -> dict | None:
    """The run's last evaluation row, or None if it never evaluated (unfinished or failed)."""
    evals = [row for row in read_metrics(run_dir) if "eval/loss" in row]
    return evals[-1] if evals else None
