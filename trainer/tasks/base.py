"""What the loop asks of a task (`model.task`): batches, the summed loss, its units, evaluation.

The loop and `trainer.evaluate` call only these methods, so a task is one module here plus one
line in `TASKS`. Losses are sums: the loop divides by the units of the whole accumulated batch
on all processes, so an update does not depend on how the batch was split.
"""
from __future__ import annotations

from typing import Any

import torch


class Task:
    name: str = ""
    # Statistics `eval_counts` sums per batch; evaluation reports each divided by the units.
    count_names: tuple[str, ...] = ()
    # Evaluate batch by batch (loss, counts); False when `eval_metrics` covers the whole held-out
    # set itself, its loss included (ranking against a pool instead of in-batch negatives).
    batch_eval: bool = True

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        # choices the task made on its own (e.g. which loss path), for the run log
        self.notes: list[str] = []

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A micro-batch of tensors from rendered examples (see trainer.data.formats)."""
        raise NotImplementedError

    def forward_loss(self, model, batch: dict) -> tuple[Any, torch.Tensor]:
        """(outputs, summed loss) of one micro-batch: the contract of the training step, evaluation
        and co-served fine-tuning. The loss is a sum over the batch's `units`.

        `outputs` go on to the method hooks' extra losses and to `eval_counts`. They are the
        model's own outputs (with `.logits` over every position), except for a causal LM on
        the loss-positions path, which returns a `trainer.loss_positions.LossPositionOutputs`:
        the final hidden states at the loss positions only, the [B, T] mask of those positions,
        the output layer, and `.logits()` for the [M, V] logits there. The full logits of that
        micro-batch never exist; hooks that read logits must accept both forms."""
        raise NotImplementedError

    def units(self, batch: dict) -> int:
        """How many terms the summed loss adds up (loss tokens, examples, queries). The loop calls it
        on the host (CPU) batch, before the batch moves to the device."""
        raise NotImplementedError

    def eval_counts(self, outputs: Any, batch: dict) -> torch.Tensor:
        """Per-batch sums of `count_names` (e.g. correct predictions), in that order."""
        return torch.zeros(0)

    @torch.no_grad()
    def eval_metrics(self, accelerator, model, examples: list[dict], batch_size: int,
                     max_batches: int | None) -> dict[str, float]:
        """Metrics over the whole held-out set (ranking); the model is in eval mode. Every process
        must run the same forwards (ZeRO-3 gathers collectively)."""
        return {}
