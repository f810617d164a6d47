"""Deterministic, resumable micro-batch order.

The order of examples is a pure function of (seed, epoch): each epoch is a fresh permutation,
cut into global batches of `batch_size * world_size` and dealt round-robin to processes. A
position is one integer (micro-batches consumed), so resuming mid-epoch is exact and costs no
data loading.
"""
from __future__ import annotations

import torch


class MicroBatchStream:
    def __init__(self, n_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        per_epoch = n_examples // (batch_size * world_size)
        if per_epoch == 0:
            raise ValueError(f"{n_examples} examples cannot fill one batch of {batch_size} on {world_size} processes")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.rank, self.world_size, self.per_epoch = rank, world_size, per_epoch
        self.position = 0  # micro-batches consumed by each process so far
        self._cached_epoch, self._cached_order = -1, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:  # one permutation per epoch, not per micro-batch
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_epoch, self._cached_order = epoch, torch.randperm(self.n, generator=g)
        return self._cached_order

    def next_indices(self) -> list[int]:
        epoch, i = divmod(self.position, self.per_epoch)
        order = self._epoch_order(epoch)
        span = self.batch_size * self.world_size
        start = i * span + self.rank * self.batch_size
        self.position += 1
        return order[start:start + self.batch_size].tolist()

    @property
    def epoch(self) -> float:
        return self.position / self.per_epoch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
