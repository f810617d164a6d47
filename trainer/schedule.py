"""Learning-rate schedule as a pure function of the step.

The loop writes `lr = base_lr * lr_factor(step)` into every param group each step. Param groups
that a method adds mid-run (TriAdaptLoRA's grown ranks) follow the schedule with no extra
bookkeeping, and resuming needs nothing but the step.
"""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier for the update at 0-based `step` of `total`: linear warm-up, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
