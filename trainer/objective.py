"""The task losses, summed (not averaged) so the loop can normalise by the token count of
the whole accumulated batch across processes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(model, batch: dict):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs)


def loss_sum(logits: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    """Sum of per-token (causal LM) or per-example (classification) cross-entropy."""
    if task == "sequence_classification":
        return F.cross_entropy(logits.float(), batch["label"], reduction="sum")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def loss_units(batch: dict, task: str) -> int:
    """How many terms `loss_sum` adds up: loss tokens, or examples for classification."""
    if task == "sequence_classification":
        return int(batch["label"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())
