"""BA-LoRA's three regularisers and their weight schedules, as plain functions of logits.

Notation: Z_F = fine-tuned (student) logits, Z_P = original-model (teacher) logits, T = temperature.
NLG inputs are (tokens x vocab) matrices of the valid positions; NLU inputs are (batch x classes).
Every function returns the *unweighted* term; the hooks multiply by the scheduled lambda.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----- consistency -------------------------------------------------------------------------------
def consistency(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(Z_P/T) || softmax(Z_F/T)).

    Rows are valid tokens (NLG, averaged over the M tokens) or examples (NLU, batch mean); the
    T^2 factor keeps gradient magnitudes comparable across temperatures (distillation practice).
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return temperature**2 * kl.mean()


# ----- diversity ---------------------------------------------------------------------------------
def topk_entropy_diversity(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """NLG: -mean entropy of the softmax over each row's top-K logits (K = 0: whole vocabulary).

    Minimising it raises the entropy among the plausible next tokens, i.e. keeps the output
    distribution from collapsing onto one token, without rewarding mass on the long tail.
    """
    z = logits.float()
    if 0 < top_k < z.shape[-1]:
        z = z.topk(top_k, dim=-1).values
    log_p = F.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return -entropy.mean()


def covariance_diversity(logits: torch.Tensor) -> torch.Tensor:
    """NLU: (1/D) * sum_{i != j} C_ij^2 with C the (D x D) covariance of the batch logits.

    Penalises correlated class logits (decorrelated output dimensions). Needs N >= 2 rows.
    """
    z = logits.float()
    n, d = z.shape
    if n < 2:
        return z.sum() * 0.0  # keeps the graph and device; a single example has no covariance
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


# ----- singular values ---------------------------------------------------------------------------
def svd_ratio(logits: torch.Tensor, top_k: int, normalizer: str, randomized_above: int | None = None) -> torch.Tensor:
    """-(sum of the k largest singular values of Z) / (||Z||_F or sum of all singular values).

    Minimising it concentrates the logit matrix's energy in its leading directions. With the
    Frobenius normaliser and more columns than `randomized_above`, the top-k values come from
    torch.svd_lowrank(q=k+5, niter=2) instead of a full decomposition (the official NLG code).
    The term is 0 for an (almost) all-zero matrix, where the ratio is undefined.
    """
    z = logits.float()
    if normalizer == "frobenius":
        denom = torch.linalg.matrix_norm(z)
        if randomized_above is not None and z.shape[-1] > randomized_above:
            q = min(top_k + 5, *z.shape)
            top = torch.svd_lowrank(z, q=q, niter=2)[1][:top_k].sum()
        else:
            top = torch.linalg.svdvals(z)[:top_k].sum()
    elif normalizer == "sum":
        sigma = torch.linalg.svdvals(z)
        denom, top = sigma.sum(), sigma[:top_k].sum()
    else:
        raise ValueError(f"unknown svd normalizer {normalizer!r}")
    if float(denom.detach()) <= 1e-8:
        return z.sum() * 0.0
    return -top / denom


# ----- schedules ---------------------------------------------------------------------------------
def consistency_weight(base: float, step: int, total_steps: int, schedule: str, final_ratio: float) -> float:
    """constant, or cosine from base (step 0) to final_ratio * base (last step)."""
    if schedule == "constant" or total_steps <= 0:
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown consistency schedule {schedule!r}")
    progress = min(1.0, max(0.0, step / total_steps))
    return base * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def focus_weight(base: float, step: int, total_steps: int, schedule: str, delay: float, ramp: float) -> float:
    """constant, or two-phase: 0 before delay*T, linear ramp over ramp*T, then base."""
    if schedule == "constant" or total_steps <= 0:
        return base
    if schedule != "two_phase":
        raise ValueError(f"unknown focus schedule {schedule!r}")
    start, length = delay * total_steps, ramp * total_steps
    if step < start:
        return 0.0
    if length <= 0 or step >= start + length:
        return base
    return base * (step - start) / length
