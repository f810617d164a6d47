"""The parameters that travel: the model's trainable ones (the whole model or the layers that
`adapter.type=none` trains, or the adapter's), in `named_parameters` order, as one flat fp32 vector.

The federated state is kept and aggregated in fp32 whatever `model.dtype` is; it is written into
the model's own parameters (cast) before a client trains or the server evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Travel:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Travel":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flat(self, model: torch.nn.Module) -> torch.Tensor:
        """The travelling parameters of `model` as a new flat fp32 CPU vector."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names])

    def load(self, model: torch.nn.Module, flat: torch.Tensor) -> None:
        """Write the flat vector into `model`'s travelling parameters."""
        params = dict(model.named_parameters())
        at = 0
        with torch.no_grad():
            for name, shape in zip(self.names, self.shapes):
                n = shape.numel()
                params[name].copy_(flat[at:at + n].view(shape))
                at += n

    def tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of the flat vector, in order."""
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = flat[at:at + shape.numel()].view(shape)
            at += shape.numel()
        return out

    def from_tensors(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector of named tensors; they must be exactly the travelling ones."""
        if set(named) != set(self.names):
            extra, missing = sorted(set(named) - set(self.names)), sorted(set(self.names) - set(named))
            raise ValueError(f"parameter set differs: unexpected {extra[:3]}, missing {missing[:3]}")
        for name, shape in zip(self.names, self.shapes):
            if named[name].shape != shape:
                raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {tuple(shape)}")
        return torch.cat([named[n].reshape(-1).to(torch.float32) for n in self.names])
