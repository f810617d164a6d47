"""The task losses, summed (not averaged) so the loop can normalise by the loss units (tokens,
examples or queries) of the whole accumulated batch across processes. The tasks in
trainer/tasks/ decide which one applies to which batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def forward(model, batch: dict, prefix: str = "", **model_kwargs):
    """`model(**inputs, **model_kwargs)` with the batch's model inputs; `prefix` picks one side of a
    pair batch (`query_input_ids`, ...)."""
    inputs = {k: batch[prefix + k] for k in MODEL_INPUTS if prefix + k in batch}
    return model(**inputs, **model_kwargs)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token next-token cross-entropy; label -100 marks positions without a loss."""
    # shift the labels, not the logits: slicing the logits would copy the largest tensor of the step
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return next_token_loss_sum(logits, shifted)


def next_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy of the logits at each position against the token that follows it
    (`targets`, already shifted; -100: no loss). A chunk of a sequence passes the targets of its
    positions, the first label of the next chunk included."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def class_loss_sum(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Sum of per-example cross-entropy."""
    return F.cross_entropy(logits.float(), label, reduction="sum")


def in_batch_softmax_sum(scores: torch.Tensor, temperature: float = 1.0,
                         excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over queries i of -log softmax_j(scores[i, j] / temperature) at j = i.

    Row i scores query i against every passage of the batch: column i is its positive, the other
    columns are its in-batch negatives (InfoNCE for a bi-encoder; the listwise softmax loss for a
    cross-encoder, with temperature 1). `excluded[i, j]` drops column j from row i: a passage that
    is no true negative for query i (see trainer.tasks.retrieval.not_negatives).
    """
    logits = scores.float() / temperature
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    target = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(logits, target, reduction="sum")
