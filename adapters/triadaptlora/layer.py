"""The TriAdaptLoRA layer: dW = (alpha / r) * B (L + U) A with a growable, block-triangular core.

Each growth step i adds a block of k_i ranks, so after it the rank is r_i = k_0 + ... + k_i:
  * A gains k_i rows        (A_i: k_i x d_in),
  * B gains k_i columns     (B_i: d_out x k_i),
  * L gains a row block     (L_i: k_i x r_i, zero-padded on the right to r),
  * U gains a column block  (U_i: r_i x k_i, zero-padded below to r).
Stacking the padded blocks makes L block-lower- and U block-upper-triangular; the diagonal
blocks get entries from both. Every block is its own nn.Parameter, so growing never replaces a
parameter the optimizer already holds: the new blocks are returned and added as a new group.

Initialisation (`init_core`), both with dW = 0 at the start and unchanged by a growth step:
  * "identity" (default; the first author's latest code, with its off-diagonal bug fixed):
    A ~ N(0, 0.02), B = 0, and each new block's diagonal part of L is the identity (U = 0),
    so C = I and the start is LoRA's: B takes the first gradient, whole columns at a time.
  * "zero" (the first author's first version, AdaLoRA-like): A, B ~ N(0, 0.02), L = U = 0.
    dW is a product of three small factors and the core, r x r entries, carries all of its
    size, so it starts far slower than LoRA under Adam (docs/results/adapters.md measures it).
Scale (`scale_rank`): alpha / r with r fixed at the reference rank (default; the author's code
hard-codes this x2), or alpha / (current rank) when None, which divides the whole learned
update by (r + k) / r at every growth step.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

INIT_STD = 0.02


class TriAdaptLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("triadaptlora_A", "triadaptlora_B", "triadaptlora_L", "triadaptlora_U")
    other_param_names = ("triadaptlora_alpha", "triadaptlora_dropout", "triadaptlora_init", "triadaptlora_scale_rank")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.triadaptlora_A = nn.ModuleDict()  # adapter -> ParameterList of row blocks of A
        self.triadaptlora_B = nn.ModuleDict()  # adapter -> ParameterList of column blocks of B
        self.triadaptlora_L = nn.ModuleDict()  # adapter -> ParameterList of row blocks of L
        self.triadaptlora_U = nn.ModuleDict()  # adapter -> ParameterList of column blocks of U
        self.triadaptlora_alpha: dict[str, float] = {}
        self.triadaptlora_init: dict[str, str] = {}  # adapter -> "identity" | "zero" (core of new blocks)
        self.triadaptlora_scale_rank: dict[str, Optional[int]] = {}  # adapter -> r of alpha / r; None = current
        self.triadaptlora_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"TriAdaptLoRA adapts nn.Linear only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    # ----- structure -------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, blocks: list[int], alpha: float, dropout: float,
                     inference_mode: bool = False, generator: Optional[torch.Generator] = None,
                     init_core: str = "identity", scale_rank: Optional[int] = None) -> None:
        """Create the adapter with the given growth-block sizes (e.g. [1] fresh, [1, 4, 4] reloaded)."""
        if not blocks or min(blocks) < 1:
            raise ValueError(f"block sizes must be positive, got {blocks}")
        if init_core not in ("identity", "zero"):
            raise ValueError(f"init_core must be 'identity' or 'zero', got {init_core!r}")
        self.triadaptlora_alpha[adapter_name] = float(alpha)
        self.triadaptlora_init[adapter_name] = init_core
        self.triadaptlora_scale_rank[adapter_name] = scale_rank
        self.triadaptlora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for container in (self.triadaptlora_A, self.triadaptlora_B, self.triadaptlora_L, self.triadaptlora_U):
            container[adapter_name] = nn.ParameterList()
        for k in blocks:
            self.grow(adapter_name, k, generator=generator)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def block_sizes(self, adapter: str) -> list[int]:
        return [int(a.shape[0]) for a in self.triadaptlora_A[adapter]]

    def rank(self, adapter: str) -> int:
        return sum(self.block_sizes(adapter))

    def scaling(self, adapter: str) -> float:
        return self.triadaptlora_alpha[adapter] / (self.triadaptlora_scale_rank[adapter] or self.rank(adapter))

    def grow(self, adapter: str, k: int, generator: Optional[torch.Generator] = None) -> list[nn.Parameter]:
        """Append one growth block of k ranks; returns the four new parameters."""
        blocks_a = self.triadaptlora_A[adapter]
        r_new = self.rank(adapter) + k
        if len(blocks_a):
            device, dtype = blocks_a[0].device, blocks_a[0].dtype
            trainable = blocks_a[0].requires_grad
        else:
            device, dtype, trainable = torch.device("cpu"), torch.float32, True

        def normal(*shape):
            # drawn on the CPU from an explicit generator, so growth is reproducible on any device
            return (torch.randn(*shape, generator=generator) * INIT_STD).to(device=device, dtype=dtype)

        a = normal(k, self.in_features)
        lower = torch.zeros(k, r_new, device=device, dtype=dtype)
        if self.triadaptlora_init[adapter] == "identity":
            b = torch.zeros(self.out_features, k, device=device, dtype=dtype)
            lower[:, r_new - k:] = torch.eye(k, device=device, dtype=dtype)  # the block's diagonal part
        else:
            b = normal(self.out_features, k)
        new = [
            nn.Parameter(a, requires_grad=trainable),
            nn.Parameter(b, requires_grad=trainable),
            nn.Parameter(lower, requires_grad=trainable),
            nn.Parameter(torch.zeros(r_new, k, device=device, dtype=dtype), requires_grad=trainable),
        ]
        for container, p in zip(
            (self.triadaptlora_A, self.triadaptlora_B, self.triadaptlora_L, self.triadaptlora_U), new
        ):
            container[adapter].append(p)
        return new

    def block_params(self, adapter: str, index: int) -> list[nn.Parameter]:
        """The four parameters (A, B, L, U) of growth block `index`."""
        return [c[adapter][index] for c in
                (self.triadaptlora_A, self.triadaptlora_B, self.triadaptlora_L, self.triadaptlora_U)]

    # ----- the update ------------------------------------------------------------------------
    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, C, B) with A: r x d_in, C = L + U: r x r, B: d_out x r."""
        r = self.rank(adapter)
        a = torch.cat(list(self.triadaptlora_A[adapter]), dim=0)
        b = torch.cat(list(self.triadaptlora_B[adapter]), dim=1)
        lower = torch.cat([F.pad(blk, (0, r - blk.shape[1])) for blk in self.triadaptlora_L[adapter]], dim=0)
        upper = torch.cat([F.pad(blk, (0, 0, 0, r - blk.shape[0])) for blk in self.triadaptlora_U[adapter]], dim=1)
        return a, lower + upper, b

    def core(self, adapter: str) -> torch.Tensor:
        return self.factors(adapter)[1]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, c, b = self.factors(adapter)
        return self.scaling(adapter) * (b @ c @ a)

    # ----- merge -------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.triadaptlora_A:
                continue
            delta = self.get_delta_weight(name).detach().to(base.weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = base.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs in the merged weights of adapter {name!r}")
                    base.weight.data = merged
                else:
                    base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.triadaptlora_A:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(name).detach().to(base.weight.dtype)


class TriAdaptLoraLinear(nn.Module, TriAdaptLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, blocks: list[int], alpha: float,
                 dropout: float, inference_mode: bool = False, generator: Optional[torch.Generator] = None,
                 init_core: str = "identity", scale_rank: Optional[int] = None, **kwargs) -> None:
        super().__init__()
        TriAdaptLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, blocks, alpha, dropout, inference_mode=inference_mode, generator=generator,
                          init_core=init_core, scale_rank=scale_rank)

    # forward lives on the nn.Module subclass: nn.Module's placeholder forward would shadow a mixin's
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.triadaptlora_A:
                continue
            a, c, b = self.factors(name)
            h = self.triadaptlora_dropout[name](self._cast_input_dtype(x, a.dtype))
            # (x A^T) C^T B^T: three thin matmuls instead of materialising the d_out x d_in update
            result = result + (h @ a.T @ c.T @ b.T) * self.scaling(name)
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "triadaptlora." + super().__repr__()
