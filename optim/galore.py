"""GaLore (Zhao et al., 2024): Adam on a low-rank projection of each weight-matrix gradient.

For a matrix W (m x n) with gradient G, every `update_proj_gap` steps the projector is rebuilt
from the SVD of G: the top-`rank` left singular vectors P (m x r, R = P^T G, r x n) or right
singular vectors Q (r x n, R = G Q^T, m x r). Adam runs on R, its direction N is projected back
(P N or N Q), scaled by `scale`, and applied; decoupled weight decay acts on the full W. The Adam
moments therefore cost r * max(m, n) each instead of m * n. Parameters of groups without a `rank`,
and non-matrix parameters, get plain AdamW. See docs/methods/optimizers.md, "GaLoreAdamW".
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from optim.base import OptimizerOptions, OptimizerSpec, register_optimizer

PROJ_TYPES = ("std", "reverse_std", "left", "right")
DEFAULT_TARGET_MODULES = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama-style
    "query", "key", "value", "dense",  # BERT-style attention and MLP
]


# ---------------------------------------------------------------------------------------------
# The projector: which side, how it is built, and the two projections.
# ---------------------------------------------------------------------------------------------

def projection_side(shape: torch.Size, proj_type: str) -> str:
    """'left' keeps P (m x r), 'right' keeps Q (r x n). 'std' projects the smaller dimension down to
    r and keeps the larger one whole (R is max(m, n) x r), as the paper and its code do;
    'reverse_std' projects the larger one."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"unknown GaLore proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


def make_projector(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Orthonormal basis of the gradient's top-`rank` singular subspace on `side`. The SVD runs in
    at least fp32 (bf16 SVD is unsupported and inaccurate); a rank above min(m, n) is clipped."""
    work = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
    u, _, vh = torch.linalg.svd(work, full_matrices=False)
    basis = u[:, :rank] if side == "left" else vh[:rank, :]
    return basis.to(grad.dtype)


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    return projector.T @ grad if side == "left" else grad @ projector.T


def project_back(low_rank: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    return projector @ low_rank if side == "left" else low_rank @ projector


# ---------------------------------------------------------------------------------------------
# The optimizer.
# ---------------------------------------------------------------------------------------------

class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups may carry GaLore settings.

    A group with `rank` set (an int) projects its 2-D parameters; the group keys are `rank`,
    `update_proj_gap`, `scale` and `proj_type` (std / reverse_std / left / right). The Adam
    moments are kept across projector refreshes, as in the reference code. The Adam arithmetic
    (bias correction, where eps enters) follows torch.optim.AdamW, so unprojected parameters are
    updated exactly as AdamW would update them."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: Optional[int] = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        # lr 0 is allowed, as in torch.optim: a schedule may add a group during warm-up.
        if group["lr"] < 0 or not group["eps"] > 0 or group["weight_decay"] < 0:
            raise ValueError(f"{type(self).__name__}: invalid lr, eps or weight_decay in a param group")
        if not all(0.0 <= b < 1.0 for b in group["betas"]):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {group['betas']}")
        if group["rank"] is not None:
            if group["rank"] < 1 or group["update_proj_gap"] < 1:
                raise ValueError(f"{type(self).__name__}: rank and update_proj_gap must be >= 1")
            if group["proj_type"] not in PROJ_TYPES:
                raise ValueError(f"{type(self).__name__}: proj_type must be one of {PROJ_TYPES}")

    # Hooks for subclasses that transform the low-rank gradient (Natural GaLore).
    def _new_subspace(self, state: dict, group: dict) -> None:
        """Called after the projector of a parameter has been rebuilt."""

    def _precondition(self, low_rank_grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """The gradient that the subspace Adam sees."""
        return low_rank_grad

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
        grad = p.grad
        low_rank = group["rank"] is not None and p.ndim == 2
        if low_rank:
            side = projection_side(p.shape, group["proj_type"])
            if state["step"] % group["update_proj_gap"] == 0:
                state["projector"] = make_projector(grad, group["rank"], side)
                self._new_subspace(state, group)
            grad = self._precondition(project(grad, state["projector"], side), state, group)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(group["eps"])
        direction = exp_avg / denom / bias_correction1
        if low_rank:
            direction = project_back(direction, state["projector"], side).mul_(group["scale"])

        # Decoupled decay on the full weight: the low-rank update would only decay the subspace.
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])


# ---------------------------------------------------------------------------------------------
# Registration: which parameters get GaLore is decided by name, as in HF `optim_target_modules`.
# ---------------------------------------------------------------------------------------------

class GaLoreOptions(OptimizerOptions):
    name: str = "galore_adamw"
    lr: float = Field(
        2e-5, gt=0,
        description="Step size of every parameter; projected matrices move by lr * scale "
        "(the paper's GLUE runs used 1e-5 to 3e-5).",
    )
    weight_decay: float = Field(
        0.0, ge=0,
        description="Decoupled weight decay on the full matrices, p <- p - lr * weight_decay * p; none on 1-D tensors.",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment decay factors.")
    eps: float = Field(1e-8, gt=0, description="Adam denominator epsilon, added as in torch.optim.AdamW.")
    rank: int = Field(8, ge=1, description="Rank r of each targeted matrix's gradient subspace (clipped to min(m, n)).")
    update_proj_gap: int = Field(
        200, ge=1, description="Rebuild each projector from the current gradient's SVD every this many steps."
    )
    scale: float = Field(
        2.0, gt=0,
        description="Multiplier alpha of the back-projected update (the paper used 2 at r=8 and 4 at r=4 "
        "for fine-tuning).",
    )
    proj_type: Literal["std", "reverse_std", "left", "right"] = Field(
        "std",
        description="Projected side: std projects the smaller dimension to rank r (as the paper), reverse_std the "
        "larger, left/right force it.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="A 2-D weight gets GaLore when its parameter name contains one of these substrings; "
        "everything else gets AdamW.",
    )


def galore_groups(named_params, opts: GaLoreOptions, **galore_keys) -> list[dict]:
    """Three groups: targeted matrices (projected, decayed), other matrices (AdamW, decayed) and
    vectors (AdamW, no decay). Refuses a configuration that would project nothing."""
    targeted, other_matrices, vectors = [], [], []
    for name, p in named_params:
        if p.ndim == 2 and any(t in name for t in opts.target_modules):
            targeted.append(p)
        else:
            (other_matrices if p.ndim >= 2 else vectors).append(p)
    if not targeted:
        raise ValueError(
            f"{opts.name}: no 2-D trainable weight name contains any of target_modules={opts.target_modules}; "
            "set optim.target_modules to substrings of your model's linear layer names."
        )
    projected = dict(
        params=targeted, weight_decay=opts.weight_decay, rank=opts.rank, update_proj_gap=opts.update_proj_gap,
        scale=opts.scale, proj_type=opts.proj_type, **galore_keys,
    )
    groups = [
        projected,
        {"params": other_matrices, "weight_decay": opts.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_galore(named_params, opts: GaLoreOptions) -> GaLoreAdamW:
    return GaLoreAdamW(galore_groups(named_params, opts), lr=opts.lr, betas=opts.betas, eps=opts.eps)


register_optimizer(
    OptimizerSpec("galore_adamw", GaLoreOptions, build_galore, full_parameter_only=True, supports_zero=False)
)
