"""AdaLoRA's orthogonality regulariser, shared by AdaLoRA and TriAdaptLoRA.

For every adapted matrix with factors A (r x d_in, rows = P in the AdaLoRA paper) and
B (d_out x r, columns = Q): R = mean over all factors of ||A A^T - I||_F and ||B^T B - I||_F,
the quantity peft's AdaLoraModel adds to `outputs.loss` when the model computes its own loss.
"""
from __future__ import annotations

from typing import Iterable

import torch


def orthogonality_penalty(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean of ||A A^T - I||_F and ||B^T B - I||_F over the (A, B) pairs; empty factors are skipped
    (ZeRO-3 partitions, which hold no rows on this process)."""
    terms = []
    for a, b in factors:
        for gram in (a @ a.T if a.numel() else None, b.T @ b if b.numel() else None):
            if gram is not None:
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()
