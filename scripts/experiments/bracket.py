"""The learning-rate sweeps' shared rule (sweep.py, optimizers.py, retrieval.py): when the best rate is at
the edge of the rates tried, try one more rate past that edge, so that the chosen rate ends up with a worse
rate on each side, or the study can say that it did not."""
from __future__ import annotations


def past_edge(scores: dict[float, float], step: float) -> float | None:
    """The next rate to try, or None when the best rate tried already has a neighbour on each side.

    scores: every rate tried -> its score, higher is better (negate a loss; a diverged run scores -inf).
    step: the grid's ratio between neighbouring rates. The new rate is rounded to two significant digits,
    so that run directories named after it stay readable and a rerun finds the same name.
    """
    best = max(scores, key=scores.__getitem__)
    if best == max(scores):
        return float(f"{best * step:.2g}")
    if best == min(scores):
        return float(f"{best / step:.2g}")
    return None
