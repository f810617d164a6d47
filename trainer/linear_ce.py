"""Summed cross-entropy of an output layer applied to hidden states, one chunk of rows at a time,
so the full (rows x vocabulary) logits never exist, neither in the forward nor in the backward.

`linear_cross_entropy_sum(hidden, head, targets)` equals
`F.cross_entropy(head(hidden).float(), targets, reduction="sum")` (tests/test_lm_loss.py checks
the value and the gradients). Three ways to get there, picked by what the call needs:

* no gradient wanted (evaluation): chunk by chunk, nothing kept;
* `head` is a plain `nn.Linear` (the usual frozen or trainable lm_head): `_LinearCrossEntropy`,
  which computes each chunk's gradients in the forward, while its logits are at hand
  (softmax - one-hot, times W or h), and keeps only d(hidden) [rows x hidden] and, when they
  train, d(W) and d(b). No logits are recomputed in the backward;
* any other module (an lm_head wrapped by a peft adapter, a modules_to_save copy): every chunk is
  checkpointed, i.e. its logits are recomputed in the backward, through the module itself, so
  whatever the wrapper does (LoRA, DoRA, dropout with its RNG state) happens as in the forward.

The first two have no double backward (`once_differentiable`): optimizers that differentiate
gradients again (AdaHessian) take the full-logits path (trainer.tasks.causal_lm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# Rows per chunk so that one chunk's fp32 logits hold about this many numbers (32 MB): large
# enough that the matmul runs at full speed, small beside the activations of a training step.
CHUNK_NUMBERS = 2**23


def chunk_rows_for(vocab_size: int) -> int:
    return max(1, CHUNK_NUMBERS // max(vocab_size, 1))


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(head(hidden[i]), targets[i]) over the rows of `hidden` [M, H]; every target is a
    class index (rows without a loss were left out by the caller). Returns an fp32 scalar."""
    if hidden.shape[0] == 0:
        return hidden.sum(dtype=torch.float32) * 0.0  # keeps the graph: a micro-batch without loss tokens
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head(hidden[:1]).shape[-1]
    rows = chunk_rows or chunk_rows_for(vocab)
    if not torch.is_grad_enabled():
        return sum(F.cross_entropy(head(h).float(), y, reduction="sum")
                   for h, y in zip(hidden.split(rows), targets.split(rows)))
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, rows)
    return sum(checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
               for h, y in zip(hidden.split(rows), targets.split(rows)))


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(h W^T + b, y) summed over rows; the gradients are formed chunk by chunk in the forward.

    d loss / d logits = softmax(logits) - onehot(y) =: G (per chunk), so
    d h = G W, d W = G^T h, d b = sum of G's rows. Matmuls run under the caller's autocast
    (bf16 on a GPU run), as autograd's would; softmax and the sums are fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        # the dtype the logits' matmul ran in (bf16 under autocast), which autograd would use too
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            if want_h:
                grad_h[start:start + rows] = (g.to(mm) @ weight.to(mm)).to(hidden.dtype)
            if want_w:
                grad_w += (g.to(mm).T @ h.to(mm)).float()
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.layout = (want_h, want_w, want_b, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        want_h, want_w, want_b, w_dtype, b_dtype = ctx.layout
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved) if want_h else None
        grad_h = grad_h * grad_total.to(grad_h.dtype) if want_h else None
        grad_w = (next(saved) * grad_total).to(w_dtype) if want_w else None
        grad_b = (next(saved) * grad_total).to(b_dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None
