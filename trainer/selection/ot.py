"""Entropic optimal transport between two point clouds, solved blockwise, and GOT-D's ranking.

Plain torch, no I/O, any device. The problem (as in POT and ott-jax):

    OT_eps(a, b) = min_P <P, C> + eps * KL(P | a b^T),   C_ij = |x_i - y_j|^2,

whose dual potentials (f, g) give the plan P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) and are
unique up to (f + c, g - c). GOT-D ranks the candidates y_j by g_j: it is dOT/db_j, the change of
the OT distance when candidate j gets more mass (Kang et al. 2024, Theorem 1).

The solver is Sinkhorn's alternating updates, written in the stabilised scaling form (Schmitzer,
"Stabilized sparse scaling algorithms", 2019): a kernel K_ij = exp((f0_i + g0_j - C_ij) / eps)
with reference potentials f0, g0 absorbed, and scalings u, v on top, so an iteration costs two
matrix-vector products with K instead of two log-sum-exps over C. The scalings are absorbed back
into K when they leave [e^-ABSORB, e^ABSORB], K is rebuilt from the points when the potentials
have drifted so far that entries it flushed to zero could matter again, and any iteration whose
sums overflow or vanish is redone in the log domain. K lives in column blocks of the candidates:
held in memory when it fits `max_kernel_bytes` (the cost matrix is never materialised either
way), otherwise recomputed from the points in every iteration (one matmul and one exp per block,
memory O((n + m) d + n * block)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Scalings are absorbed into the kernel beyond e^±ABSORB (in units of eps): products of K and the
# scalings stay far from overflow in float32.
ABSORB = 20.0
# K flushes entries below e^-UNDERFLOW(dtype) to zero when built; a rebuild is due once the
# potentials have moved by this much less than that (entries it lost are then still < e^-SAFETY).
SAFETY = 30.0
BLOCK_BYTES = 64 * 2**20


@dataclass
class OTResult:
    f: torch.Tensor  # potentials on the first cloud (the target), cost units, float64
    g: torch.Tensor  # potentials on the second cloud (the candidates)
    transport_cost: float  # <P, C>
    objective: float  # the entropic dual objective <f, a> + <g, b> (= the primal at convergence)
    error: float  # L1 marginal error of the returned plan (max over both marginals)
    iterations: int
    converged: bool
    kernel_in_memory: bool
    block_size: int
    rebuilds: int = 0  # kernel rebuilds from the points (cached kernel only)
    safe_iterations: int = 0  # iterations run in the log domain (start and numerical fallbacks)
    errors: list[float] = field(default_factory=list)  # error after every iteration


def pairwise_sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 for every pair (n, m), clamped at 0 against rounding in the expansion."""
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min_(0)


class _Clouds:
    """The two clouds and the column blocks of the candidates; everything scaled by 1/eps."""

    def __init__(self, x, y, eps, block_size):
        self.x, self.y, self.eps = x, y, eps
        self.x_sq, self.y_sq = (x * x).sum(1), (y * y).sum(1)
        self.starts = list(range(0, y.shape[0], block_size))
        self.block_size = block_size

    def cols(self, k: int) -> slice:
        return slice(self.starts[k], self.starts[k] + self.block_size)

    def scaled_cost(self, k: int) -> torch.Tensor:
        """C / eps for candidate block k, (n, block)."""
        y, y_sq = self.y[self.cols(k)], self.y_sq[self.cols(k)]
        cost = torch.addmm(self.x_sq[:, None] + y_sq[None, :], self.x, y.T, alpha=-2.0).clamp_min_(0)
        return cost.div_(self.eps)

    def kernel(self, k: int, f0: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
        """exp(f0_i + g0_j - C_ij / eps) for block k (potentials in units of eps)."""
        exponent = self.scaled_cost(k).neg_().add_(f0[:, None]).add_(g0[self.cols(k)][None, :])
        return exponent.exp_()


def sinkhorn(
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 1000,
    momentum: float = 1.0,
    block_size: Optional[int] = None,
    max_kernel_bytes: int = 4 * 2**30,
    progress: Optional[Callable[[int, float], None]] = None,
) -> OTResult:
    """Solve OT_eps between x (n, d) with weights a and y (m, d) with weights b (uniform by
    default) to an L1 marginal error below `tol`, or stop after `max_iter` iterations.

    `momentum` is the over-relaxation factor omega in [1, 2) (1: plain Sinkhorn; ott-jax's
    `Momentum(1.3)` is the same extrapolation). Works in the dtype and on the device of x.
    `progress(iteration, error)` is called after every iteration.
    """
    if not 1.0 <= momentum < 2.0:
        raise ValueError(f"momentum must be in [1, 2), got {momentum}")
    n, m = x.shape[0], y.shape[0]
    dtype, device = x.dtype, x.device
    y = y.to(dtype=dtype, device=device)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=device) if a is None else a.to(dtype=dtype, device=device)
    b = torch.full((m,), 1.0 / m, dtype=dtype, device=device) if b is None else b.to(dtype=dtype, device=device)
    itemsize = torch.finfo(dtype).bits // 8
    block = block_size or max(1, min(m, BLOCK_BYTES // (itemsize * max(n, 1))))
    in_memory = n * m * itemsize <= max_kernel_bytes
    clouds = _Clouds(x, y, epsilon, block)
    log_a, log_b = a.log().double(), b.log().double()
    omega = momentum
    rebuild_after = -math.log(torch.finfo(dtype).tiny) - SAFETY

    # potentials in units of eps, float64 (they accumulate many small updates)
    f = torch.zeros(n, dtype=torch.float64, device=device)
    g = torch.zeros(m, dtype=torch.float64, device=device)
    errors: list[float] = []
    state = {"safe": 0, "rebuilds": 0}

    def safe_iteration(relax: float) -> tuple[float, float]:
        """One alternating update in the log domain from the points: never over- or underflows."""
        state["safe"] += 1
        row_lse = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        col_err = 0.0
        f_w = (f + log_a).to(dtype)
        for k in range(len(clouds.starts)):
            cols = clouds.cols(k)
            scaled = clouds.scaled_cost(k)
            g_plain = -torch.logsumexp(f_w[:, None] - scaled, dim=0).double()
            col_err += float((b[cols].double() * (g[cols] - g_plain).exp().sub(1).abs()).sum())
            g[cols] = (1 - relax) * g[cols] + relax * g_plain
            part = torch.logsumexp((g[cols] + log_b[cols]).to(dtype)[None, :] - scaled, dim=1).double()
            row_lse = torch.logaddexp(row_lse, part)
        row_err = float((a.double() * (f + row_lse).exp().sub(1).abs()).sum())
        f.mul_(1 - relax).add_(-row_lse, alpha=relax)
        return col_err, row_err

    # the cached kernel, its reference potentials and the scalings on top (log u, log v)
    kernel: list[torch.Tensor] = []
    f0, g0 = f.clone(), g.clone()

    def build_kernel(init: bool = False) -> None:
        kernel.clear()
        f0_w = f.to(dtype)
        for k in range(len(clouds.starts)):
            cols = clouds.cols(k)
            exponent = clouds.scaled_cost(k).neg_()
            if init:
                g[cols] = -exponent.max(dim=0).values.double()
            kernel.append(exponent.add_(f0_w[:, None]).add_(g[cols].to(dtype)[None, :]).exp_())
        f0.copy_(f)
        g0.copy_(g)
        state["rebuilds"] += 0 if init else 1

    def scaled_iteration() -> Optional[tuple[float, float]]:
        """One alternating update as matrix-vector products with K; None if a sum over- or
        underflowed (the caller redoes it in the log domain). One host sync, for the error."""
        log_u = f - f0 if in_memory else torch.zeros_like(f)
        au = (a.double() * log_u.exp()).to(dtype)
        f0_w = (f0 if in_memory else f).to(dtype)
        g_w = None if in_memory else g.to(dtype)
        row = torch.zeros(n, dtype=torch.float64, device=device)
        col_err = torch.zeros((), dtype=torch.float64, device=device)
        col_bad = torch.zeros((), dtype=torch.bool, device=device)
        g_new = torch.empty_like(g)
        for k in range(len(clouds.starts)):
            cols = clouds.cols(k)
            block = kernel[k] if in_memory else clouds.kernel(k, f0_w, g_w)
            ref = g0[cols] if in_memory else g[cols]
            log_v = g[cols] - ref
            col = torch.mv(block.T, au).double()  # column sums of P / b, without v
            col_bad |= ~(torch.isfinite(col) & (col > 0)).all()
            log_col = col.log()
            col_err += (b[cols].double() * (log_v + log_col).exp().sub(1).abs()).sum()
            log_v_new = (1 - omega) * log_v - omega * log_col
            g_new[cols] = ref + log_v_new
            row += torch.mv(block, (b[cols].double() * log_v_new.exp()).to(dtype)).double()
        row_err = (a.double() * (log_u.exp() * row).sub(1).abs()).sum()
        bad = col_bad | ~(torch.isfinite(row) & (row > 0)).all()
        errs = torch.stack([col_err, row_err, bad.double()]).tolist()
        if errs[2]:
            return None
        g.copy_(g_new)
        # f_new = f_ref + log u_new, log u_new = (1 - omega) log u - omega log(row sums)
        f.copy_((f0 if in_memory else f) + (1 - omega) * log_u - omega * row.log())
        return errs[0], errs[1]

    if in_memory:
        # g0_j = min_i C_ij / eps (f0 = 0): every column of K then has the entry 1, so no column
        # underflows, and building K costs one pass over the points
        build_kernel(init=True)
        errors.append(math.inf)
    else:
        col_err, row_err = safe_iteration(1.0)  # from f = g = 0: sets both potentials to scale
        errors.append(max(col_err, row_err))
    iteration = 1 if not in_memory else 0
    while errors[-1] > tol and iteration < max_iter:
        if in_memory:
            drift = float((f - f0).abs().max()) + float((g - g0).abs().max())
            if drift > rebuild_after:
                build_kernel()
            elif drift > ABSORB:
                _absorb(kernel, clouds, f, g, f0, g0, dtype)
        result = scaled_iteration()
        if result is None:  # a sum over- or underflowed: redo in the log domain, restart K from there
            result = safe_iteration(omega if iteration else 1.0)
            if in_memory:
                build_kernel()
        iteration += 1
        errors.append(max(result))
        if progress is not None:
            progress(iteration, errors[-1])
        if not math.isfinite(errors[-1]):
            break
    if in_memory:
        errors = errors[1:]

    fin_f, fin_g = f * epsilon, g * epsilon
    if in_memory:
        cost = _transport_cost_from_kernel(kernel, clouds, f, g, f0, g0, a, b, dtype) * epsilon
    else:
        cost = _transport_cost(clouds, f, g, log_a, log_b, dtype) * epsilon
    objective = float((a.double() * fin_f).sum() + (b.double() * fin_g).sum())
    kernel.clear()
    converged = math.isfinite(errors[-1]) and errors[-1] <= tol
    return OTResult(fin_f, fin_g, cost, objective, errors[-1], iteration, converged, in_memory, block,
                    state["rebuilds"], state["safe"], errors)


def _absorb(kernel, clouds, f, g, f0, g0, dtype) -> None:
    """Fold the scalings into K (K_ij *= u_i v_j) and make the current potentials the reference."""
    u = (f - f0).exp().to(dtype)
    for k, block in enumerate(kernel):
        block.mul_(u[:, None]).mul_((g[clouds.cols(k)] - g0[clouds.cols(k)]).exp().to(dtype)[None, :])
    f0.copy_(f)
    g0.copy_(g)


def _transport_cost(clouds, f, g, log_a, log_b, dtype) -> float:
    """<P, C> / eps, block by block from the points (one pass; the plan is never stored)."""
    total = 0.0
    f_w = (f + log_a).to(dtype)
    for k in range(len(clouds.starts)):
        cols = clouds.cols(k)
        scaled = clouds.scaled_cost(k)
        plan = (f_w[:, None] + (g[cols] + log_b[cols]).to(dtype)[None, :] - scaled).exp_()
        total += float((plan * scaled).sum(dtype=torch.float64))
    return total


def _transport_cost_from_kernel(kernel, clouds, f, g, f0, g0, a, b, dtype) -> float:
    """<P, C> / eps from the held kernel, without the points: C_ij / eps = f0_i + g0_j - log K_ij."""
    au = a.double() * (f - f0).exp()
    total = torch.zeros((), dtype=torch.float64, device=f.device)
    for k, block in enumerate(kernel):
        cols = clouds.cols(k)
        bv = b[cols].double() * (g[cols] - g0[cols]).exp()
        row = torch.mv(block, bv.to(dtype)).double()  # sum_j K_ij b_j v_j
        col = torch.mv(block.T, au.to(dtype)).double()  # sum_i a_i u_i K_ij
        entropy_part = torch.mv(torch.special.xlogy(block, block), bv.to(dtype)).double()
        total += (au * f0 * row).sum() + (col * bv * g0[cols]).sum() - (au * entropy_part).sum()
    return float(total)


def calibrated_gradient(g: torch.Tensor) -> torch.Tensor:
    """LAVA's calibration of the candidate potentials, g_j - sum_{i != j} g_i / (m - 1): the
    gradient of the OT distance when the mass moved onto candidate j comes evenly from the rest.
    An increasing affine map of g, so it ranks exactly as g does (and is free of g's constant)."""
    m = g.shape[0]
    if m < 2:
        return g - g
    return g - (g.sum() - g) / (m - 1)


def gradient_order(g: torch.Tensor) -> torch.Tensor:
    """Candidates best first: most negative gradient first (ties by index, so runs repeat)."""
    return torch.sort(g, stable=True).indices
