"""Padding-free forward of padded causal-LM batches (`train.padding_free`, on by default).

A padded micro-batch [B, T] spends the decoder's whole work (every projection, MLP and attention
row) on its padding too: on chit-chat at max_length 256 and 4 rows, 27% of the positions are
padding. Here the rows' real tokens are laid end to end as one row of B documents, positions
restarting at 0 for each, and the model runs on that row alone; a per-document attention
(`sdpa_varlen` on the CPU, flash-attention's variable-length kernel on CUDA) keeps the documents
apart, so every real token sees exactly what it saw in its padded row: same positions, same
causal context. Only the padding's work is gone.

The batch itself stays padded everywhere else (collation, loss units, the method hooks' view),
so this is a property of the forward only: `unpad` gives the model inputs and the mask that maps
the one row back to the [B, T] layout. It applies to right-padded rows (trainer.data.Collator's)
of a model whose attention keeps documents apart; anything else runs padded as before.
LoRA dropout draws its masks over [1, N] instead of [B, T], so with dropout on, the draws (not
their distribution) differ from the padded forward's.
"""
from __future__ import annotations

import torch

# attention implementations that attend within each document of a row whose positions restart
DOCUMENT_ATTENTION = ("sdpa_varlen", "flash_attention_2")


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed engine wrappers (peft's own wrapper is kept)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def applies(model) -> bool:
    """Whether `model`'s attention keeps the documents of one row apart (see DOCUMENT_ATTENTION)."""
    return getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None) in DOCUMENT_ATTENTION


def unpad(batch: dict) -> tuple[dict, torch.Tensor] | None:
    """(model inputs of one row holding the real tokens of every row, [B, T] bool mask of those
    tokens in row-major order); None when the batch has no padding or is not right-padded."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch:
        return None
    mask = mask.bool()
    if bool(mask.all()):
        return None  # nothing to remove
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device).expand_as(mask)
    if not torch.equal(mask, positions < mask.sum(1, keepdim=True)):
        return None  # not right padding: real tokens after padding would get wrong positions
    inputs = {"input_ids": batch["input_ids"][mask][None], "position_ids": positions[mask][None]}
    return inputs, mask
