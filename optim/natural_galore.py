"""Natural GaLore (Das, 2024): GaLore whose low-rank gradient is first multiplied by the inverse
of a damped empirical Fisher built from the last s low-rank gradients.

With g the flattened low-rank gradient (length k) and G = [g_t, ..., g_{t-s+1}] (k x s, the
current gradient included), following the reference implementation (docs/methods/optimizers.md, "NaturalGaLore"):

    F = lambda I + G G^T                       (the paper writes G G^T / s; the code does not)
    F^-1 g = g / lambda - G (I_s + G^T G / lambda)^-1 G^T g / lambda^2        (Woodbury)

Because g is itself a column of G (g = G e_c), the Woodbury form reduces to

    F^-1 g = G S^-1 e_c / lambda,   S = I_s + G^T G / lambda,

one s x s Cholesky solve that never subtracts two large nearly equal k-vectors (the direct form
loses digits when the gradients are large against lambda). The result then goes through the
subspace Adam exactly as in GaLore.

Differences from the reference code, on purpose: the projection is GaLore's one-sided projector
(the reference uses a two-sided Tucker projection of every matrix), and the history is cleared
whenever the projector is rebuilt, since gradients expressed in an old basis are not
coordinates of the new subspace (the reference keeps them).
"""
from __future__ import annotations

import torch
from pydantic import Field

from optim.base import OptimizerSpec, register_optimizer
from optim.galore import GaLoreAdamW, GaLoreOptions, galore_groups


def natural_gradient(history: torch.Tensor, current: int, damping: float) -> torch.Tensor:
    """(damping I + H^T H)^-1 h_c for the history rows H (t x k) and its row h_c = H[current].

    The t x t system is solved in float64: S has eigenvalues from 1 to 1 + |G|^2 / damping, which
    in float32 can lose positive definiteness to rounding when the gradients are large."""
    rows = history.to(torch.float64)
    gram = rows @ rows.T
    system = torch.eye(len(rows), dtype=torch.float64, device=rows.device) + gram / damping
    unit = torch.zeros(len(rows), 1, dtype=torch.float64, device=rows.device)
    unit[current] = 1.0
    weights = torch.cholesky_solve(unit, torch.linalg.cholesky(system))
    work = torch.promote_types(history.dtype, torch.float32)
    return (weights.T.to(work) @ history.to(work)).squeeze(0).div_(damping).to(history.dtype)


class NaturalGaLore(GaLoreAdamW):
    """GaLoreAdamW with a natural-gradient transform of each low-rank gradient.

    Extra group keys: `natural_history` (s, the number of past low-rank gradients kept per
    matrix, which costs s * k floats) and `damping` (lambda)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        natural_history: int = 20,
        damping: float = 1e-3,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            natural_history=natural_history, damping=damping,
        )
        # GaLoreAdamW.__init__ only fixes the defaults; the extra keys must be in them before
        # the first param group is added (and checked), so the base Optimizer is set up here.
        torch.optim.Optimizer.__init__(self, params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["natural_history"] < 1 or not group["damping"] > 0:
            raise ValueError("NaturalGaLore: natural_history must be >= 1 and damping > 0")

    def _new_subspace(self, state: dict, group: dict) -> None:
        state["history_count"] = 0  # the buffer stays allocated; its rows are stale

    def _precondition(self, low_rank_grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        size = group["natural_history"]
        flat = low_rank_grad.reshape(-1)
        if "history" not in state:
            state["history"] = torch.zeros(size, flat.numel(), dtype=flat.dtype, device=flat.device)
        # A ring buffer: row `count % size` is overwritten, so no copy shifts the history.
        current = state["history_count"] % size
        state["history"][current] = flat
        state["history_count"] += 1
        filled = min(state["history_count"], size)
        direction = natural_gradient(state["history"][:filled], current, group["damping"])
        return direction.view_as(low_rank_grad)


class NaturalGaLoreOptions(GaLoreOptions):
    name: str = "natural_galore"
    natural_history: int = Field(
        20, ge=1,
        description="s: low-rank gradients kept per matrix for the empirical Fisher "
        "(s * rank * max(m, n) extra floats per matrix).",
    )
    damping: float = Field(
        1e-3, gt=0, description="lambda: Tikhonov damping of the empirical Fisher (the reference hard-codes 1e-3)."
    )


def build_natural_galore(named_params, opts: NaturalGaLoreOptions) -> NaturalGaLore:
    groups = galore_groups(named_params, opts, natural_history=opts.natural_history, damping=opts.damping)
    return NaturalGaLore(groups, lr=opts.lr, betas=opts.betas, eps=opts.eps)


register_optimizer(
    OptimizerSpec(
        "natural_galore", NaturalGaLoreOptions, build_natural_galore, full_parameter_only=True, supports_zero=False
    )
)
