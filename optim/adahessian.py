"""AdaHessian (Yao et al., 2021): Adam with the squared gradient replaced by a Hutchinson
estimate of the Hessian diagonal.

The training loop must call `loss.backward(create_graph=True)` whenever `wants_create_graph()`
is True, because the Hessian-vector product is taken through the graph that `p.grad` carries.
Update rule (docs/methods/optimizers.md, "AdaHessian"):

    D   = spatial_average(|mean_i z_i * H z_i|)            z_i Rademacher, on Hessian steps
    m   = b1 m + (1 - b1) g               v = b2 v + (1 - b2) D*D   (v: Hessian steps only)
    p  <- p - lr*wd*p - lr * (m / (1 - b1^t)) / ((v / (1 - b2^h))^(k/2) + eps)

with t the number of gradient steps and h the number of Hessian estimates a parameter has had.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from pydantic import Field, field_validator

from optim.adamw import decay_groups
from optim.base import OptimizerOptions, OptimizerSpec, register_optimizer

SPATIAL_MODES = ("none", "row", "block")


def rademacher_like(p: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Entries +1 or -1 with probability 1/2 each (note: randint's `high` is exclusive)."""
    bits = torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return bits.mul_(2).sub_(1)


def hutchinson_diagonal(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    n_samples: int = 1,
    generator_for: Callable[[torch.device], Optional[torch.Generator]] = lambda device: None,
) -> list[torch.Tensor]:
    """Unbiased estimate of diag(H) per parameter: the mean over probes of z * (H z).

    `grads` must carry a graph (backward with create_graph=True). Parameters whose gradient is
    constant have zero Hessian rows and get a zero estimate."""
    with_graph = [i for i, g in enumerate(grads) if g.requires_grad]
    if not with_graph:
        raise RuntimeError(
            "AdaHessian needs a Hessian estimate on this step, but the gradients carry no graph: "
            "call loss.backward(create_graph=True) when optimizer.wants_create_graph() is True."
        )
    estimate = [torch.zeros_like(p) for p in params]
    for sample in range(n_samples):
        # One probe per parameter, drawn in a fixed order so a seeded run is reproducible.
        probes = [rademacher_like(p, generator_for(p.device)) for p in params]
        hz = torch.autograd.grad(
            [grads[i] for i in with_graph],
            params,
            grad_outputs=[probes[i] for i in with_graph],
            retain_graph=sample < n_samples - 1,  # the last probe frees the double-backward graph
            allow_unused=True,
        )
        for est, z, hz_p in zip(estimate, probes, hz):
            if hz_p is not None:
                est.addcmul_(z, hz_p, value=1.0 / n_samples)
    return estimate


def spatial_average(d: torch.Tensor, mode: str, block_size: int) -> torch.Tensor:
    """Share one curvature value among neighbouring entries of a matrix, which lowers the
    variance of the estimate. 1-D tensors (biases, norms) are left alone, as in the reference.

    row:   the mean over the last dimension (one value per output row of a Linear weight).
    block: the mean over consecutive blocks of `block_size` elements of the flattened tensor;
           a shorter final block is averaged over its own length."""
    if mode == "none" or d.ndim < 2:
        return d
    if mode == "row":
        return d.mean(dim=-1, keepdim=True).expand_as(d).clone()
    flat = d.reshape(-1)
    full = flat.numel() // block_size * block_size
    parts = []
    if full:
        parts.append(flat[:full].view(-1, block_size).mean(dim=1).repeat_interleave(block_size))
    if full < flat.numel():
        tail = flat[full:]
        parts.append(tail.mean().expand_as(tail))
    return torch.cat(parts).view_as(d)


class AdaHessian(torch.optim.Optimizer):
    """AdaHessian with a delayed Hessian update.

    Every `hessian_interval` steps (the first step included) the gradients must carry a graph;
    `n_samples` Rademacher probes then estimate the Hessian diagonal, which updates the second
    moment. On the steps in between the second moment is reused unchanged, so those steps need
    only an ordinary backward. The probes come from a torch.Generator per device, seeded with
    `seed`, whose state is saved in `state_dict()` so a resumed run draws the same probes."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        spatial_average: str = "none",
        block_size: int = 32,
        n_samples: int = 1,
        hessian_interval: int = 1,
        seed: int = 0,
    ):
        if n_samples < 1 or hessian_interval < 1:
            raise ValueError("AdaHessian: n_samples and hessian_interval must be >= 1")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            spatial_average=spatial_average, block_size=block_size,
        )
        super().__init__(params, defaults)
        # The probe and the schedule span all parameters at once (one joint Hessian-vector
        # product per probe), so they are optimizer-wide rather than per group.
        self.n_samples = n_samples
        self.hessian_interval = hessian_interval
        self.seed = seed
        self._steps = 0
        self._generators: dict[str, torch.Generator] = {}
        self._saved_rng: dict[str, torch.Tensor] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]  # checked after the defaults are filled in
        # lr 0 is allowed, as in torch.optim: a schedule may add a group during warm-up.
        if group["lr"] < 0 or not group["eps"] > 0 or group["weight_decay"] < 0:
            raise ValueError("AdaHessian: lr and weight_decay must be >= 0 and eps > 0")
        if not all(0.0 <= b < 1.0 for b in group["betas"]):
            raise ValueError(f"AdaHessian: betas must lie in [0, 1), got {group['betas']}")
        if not 0.0 < group["hessian_power"] <= 1.0:
            raise ValueError(f"AdaHessian: hessian_power must lie in (0, 1], got {group['hessian_power']}")
        if group["spatial_average"] not in SPATIAL_MODES or group["block_size"] < 1:
            raise ValueError(f"AdaHessian: spatial_average must be one of {SPATIAL_MODES} with block_size >= 1")

    def wants_create_graph(self) -> bool:
        """True when the next step() estimates the Hessian and so needs grads with a graph."""
        return self._steps % self.hessian_interval == 0

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._saved_rng:
                gen.set_state(self._saved_rng.pop(key))
            self._generators[key] = gen
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        params = [p for p, _ in entries]
        diagonals: list[Optional[torch.Tensor]] = [None] * len(entries)
        if entries and self.wants_create_graph():
            estimate = hutchinson_diagonal(params, [p.grad for p in params], self.n_samples, self._generator)
            diagonals = [
                spatial_average(est.abs_(), group["spatial_average"], group["block_size"])
                for est, (_, group) in zip(estimate, entries)
            ]
        for (p, group), diag in zip(entries, diagonals):
            self._update(p, p.grad.detach(), diag, group)
        # A grad built with create_graph references the graph that produced it, and the graph
        # references the parameter: a cycle that keeps every activation alive. Dropping the
        # grad's history here keeps memory flat whatever the loop does with zero_grad().
        for p in params:
            if p.grad.requires_grad:
                p.grad = p.grad.detach()
        self._steps += 1
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, diag: Optional[torch.Tensor], group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["hessian_step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_hessian_diag_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        if diag is not None:
            state["hessian_step"] += 1
            state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(diag, diag, value=1 - beta2)
        if state["hessian_step"] == 0:
            # A parameter that first got a gradient between Hessian steps has no curvature yet;
            # it accumulates momentum and moves from its first Hessian step on.
            return
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["hessian_step"]
        denom = (state["exp_hessian_diag_sq"] / bias_correction2).pow_(group["hessian_power"] / 2).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)

    def state_dict(self) -> dict:
        state = super().state_dict()
        rng = dict(self._saved_rng)  # generators not created since a load keep their saved state
        rng.update({key: gen.get_state() for key, gen in self._generators.items()})
        state["adahessian"] = {"steps": self._steps, "rng": rng}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("adahessian")
        super().load_state_dict(state_dict)
        self._steps = int(extra["steps"])
        self._generators = {}
        self._saved_rng = {key: value.clone() for key, value in extra["rng"].items()}


class AdaHessianOptions(OptimizerOptions):
    name: str = "adahessian"
    lr: float = Field(
        1e-3, gt=0,
        description="Step size. The vision default 0.15 is unsafe for language-model fine-tuning; 1e-3 is "
        "about 5x a LoRA AdamW lr and 30-50x a full fine-tuning one (docs/methods/optimizers.md).",
    )
    weight_decay: float = Field(
        0.0, ge=0,
        description="Decoupled weight decay, p <- p - lr * weight_decay * p; never applied to 1-D tensors.",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="EMA factors of the gradient and of the squared Hessian diagonal."
    )
    eps: float = Field(
        1e-4, gt=0,
        description="Added to the curvature denominator; caps the step where the curvature is near zero.",
    )
    hessian_power: float = Field(
        1.0, gt=0, le=1,
        description="Exponent k of the curvature denominator: 1 is Newton-like, 0.5 the torch-optimizer default.",
    )
    spatial_average: Literal["none", "row", "block"] = Field(
        "none", description="Average the Hessian diagonal of matrices per row, per block of block_size elements, or not."
    )
    block_size: int = Field(32, ge=1, description="Block length for spatial_average='block' (the IWSLT recipe used 32).")
    n_samples: int = Field(1, ge=1, description="Rademacher probes per Hessian estimate; each costs one extra backward.")
    hessian_interval: int = Field(
        1, ge=1,
        description="Estimate the Hessian every this many steps; the steps between need no create_graph and "
        "reuse the last estimate.",
    )
    seed: int = Field(0, description="Seed of the Rademacher probe generator (its state is checkpointed).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("each beta must lie in [0, 1)")
        return betas


def build_adahessian(named_params, opts: AdaHessianOptions) -> AdaHessian:
    return AdaHessian(
        decay_groups(named_params, opts.weight_decay),
        lr=opts.lr, betas=opts.betas, eps=opts.eps, hessian_power=opts.hessian_power,
        spatial_average=opts.spatial_average, block_size=opts.block_size, n_samples=opts.n_samples,
        hessian_interval=opts.hessian_interval, seed=opts.seed,
    )


register_optimizer(
    OptimizerSpec("adahessian", AdaHessianOptions, build_adahessian, supports_zero=False, double_backward=True)
)
