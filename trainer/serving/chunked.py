"""Token-level fine-tuning: training sequences through the model in chunks of tokens, forward
and backward, so that their work can be spread over engine iterations (FlexLLM's token-level
fine-tuning; FlexLLM splits the backward by layers, we split it by the same token chunks).

A chunk covers the same positions [s, e) of every row of a group (a micro-batch's rows, right-padded
to the longest): one model call per chunk whatever the number of rows, because on a CPU a forward
call pays a large fixed cost (reading every weight once) that several rows share. Right padding
needs no attention mask: a real token attends only to earlier positions, which are real too; the
padded positions carry no loss.

Forward of chunk k (tokens [s, e)): the model runs those tokens with a KV cache that holds the
keys/values of chunks 0..k-1 as *leaves* (detached copies that require grad) and returns the
chunk's summed next-token loss; the keys/values the chunk computed are kept (as graph tensors),
and detached copies of them become the leaves later chunks attend to.

Backward, in reverse chunk order: chunk k backpropagates its loss and, through its keys/values,
the gradients that the later chunks' backwards left on its leaves. Gradients of the LoRA weights
accumulate across chunks exactly as in one backward of the whole sequence (the chain rule over
the chunk graph, taken in reverse topological order); tests/test_serving_chunked.py checks loss
and gradients against a full-sequence forward/backward.

A unit that covers the whole sequence at once (no past: the common case when the engine has time
for a whole micro-batch) does not need the chunk machinery at all: with `whole` given, it runs the
training loop's own loss on the micro-batch instead (the task's `forward_loss`: lm_head only at the
loss positions, and padding-free rows where the model's attention allows), so it costs what a
micro-batch of `train_step` costs.

Memory: each chunk's attention saves the keys/values of its whole prefix, so a sequence of L tokens
in chunks of c saves about L^2/(2c) positions per layer (and row) instead of L.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.data.formats import IGNORE
from trainer.linear_ce import linear_cross_entropy_sum
from trainer.loss_positions import forward_at_positions
from trainer.objective import next_token_loss_sum
from trainer.serving import kv


@dataclass
class _Chunk:
    start: int
    end: int
    loss: torch.Tensor  # scaled, still in the graph
    computed: list[tuple[torch.Tensor, torch.Tensor]]  # this chunk's K/V per layer, in the graph
    leaves: list[tuple[torch.Tensor, torch.Tensor]]  # their detached copies, attended by later chunks


class ChunkedSequence:
    """Sequences (`input_ids` [rows, length] right-padded, or one 1-D sequence; `labels` alike with
    -100 where there is no loss) whose summed loss, multiplied by `scale`, is backpropagated chunk
    by chunk. `lengths`: each row's real tokens (default: all). `whole`: computes the summed loss of
    all rows in one forward (the trainer's task loss), used when one unit covers the whole sequence.
    `head_rows`: a chunk applies lm_head at its loss positions only, this many rows at a time
    (trainer.loss_positions, as the loop's causal-LM loss; None: full logits)."""

    def __init__(self, model, input_ids: torch.Tensor, labels: torch.Tensor, scale: float,
                 lengths: list[int] | None = None, whole: Callable[[], torch.Tensor] | None = None,
                 head_rows: int | None = None):
        self.model, self.scale, self.whole, self.head_rows = model, scale, whole, head_rows
        self.input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        labels = labels if labels.dim() == 2 else labels[None]
        self.targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # the token each position predicts
        self.lengths = list(lengths) if lengths is not None else [self.input_ids.shape[1]] * self.rows
        self.position = 0  # tokens forwarded so far
        self.chunks: list[_Chunk] = []  # forwarded, not yet backpropagated
        self.loss_sum = 0.0  # unscaled summed loss of the forwarded chunks
        self._config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self._cache_kwarg = kv.cache_kwarg(model)

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def real_tokens(self, start: int, end: int) -> int:
        """Tokens of positions [start, end) that are not padding, over all rows."""
        return sum(max(0, min(end, n) - start) for n in self.lengths)

    @property
    def to_forward(self) -> int:
        return len(self) - self.position

    @property
    def next_backward(self) -> tuple[int, int] | None:
        """(tokens, past) of the chunk the next backward covers, once the forward is complete."""
        if self.to_forward or not self.chunks:
            return None
        c = self.chunks[-1]
        return c.end - c.start, c.start

    def forward(self, n: int) -> int:
        """Forward the next n positions of every row; returns the real (not padding) tokens done."""
        start, end = self.position, min(self.position + n, len(self))
        if start == 0 and end == len(self) and self.whole is not None:
            return self._forward_whole()
        # all of it in the graph (the engine runs with autograd off): the past joined from the
        # earlier chunks' leaves, the model call, the loss
        with torch.enable_grad():
            if self.chunks:
                past = [(torch.cat([c.leaves[i][0] for c in self.chunks], dim=-2),
                         torch.cat([c.leaves[i][1] for c in self.chunks], dim=-2))
                        for i in range(len(self.chunks[0].leaves))]
                cache = kv.cache_from(self._config, past)
            else:
                cache = kv.new_cache(self._config)
            inputs = {"input_ids": self.input_ids[:, start:end],
                      "position_ids": torch.arange(start, end).expand(self.rows, -1)}
            targets = self.targets[:, start:end]
            if self.head_rows:  # lm_head and the cross-entropy at the loss positions only, as the loop
                at = targets != IGNORE
                out = forward_at_positions(self.model, inputs, at, use_cache=True, **{self._cache_kwarg: cache})
                with out.autocast():
                    loss = linear_cross_entropy_sum(out.hidden, out.head, targets[at], self.head_rows)
            else:
                out = self.model(**inputs, use_cache=True, **{self._cache_kwarg: cache})
                loss = next_token_loss_sum(out.logits, targets)
            scaled = loss * self.scale
            computed = kv.tail(cache, end - start)  # slices of graph tensors: graph tensors too
        del out
        # a K/V that no trainable weight reaches (layer 0's k_proj without LoRA) stays a plain
        # tensor: no gradient has to flow back into it
        leaves = [(k.detach().requires_grad_(k.requires_grad), v.detach().requires_grad_(v.requires_grad))
                  for k, v in computed]
        self.chunks.append(_Chunk(start, end, scaled, computed, leaves))
        self.loss_sum += float(loss.detach())
        self.position = end
        return self.real_tokens(start, end)

    def _forward_whole(self) -> int:
        with torch.enable_grad():
            loss = self.whole()
            scaled = loss * self.scale
        self.chunks.append(_Chunk(0, len(self), scaled, [], []))  # no K/V: no later chunk attends to it
        self.loss_sum += float(loss.detach())
        self.position = len(self)
        return self.real_tokens(0, len(self))

    def backward(self) -> None:
        """Backpropagate the last chunk not yet backpropagated (call after the forward is complete)."""
        assert not self.to_forward and self.chunks, "backward runs after the whole sequence is forwarded"
        chunk = self.chunks.pop()
        outputs, grads = [chunk.loss], [torch.ones_like(chunk.loss)]
        for (k, v), (leaf_k, leaf_v) in zip(chunk.computed, chunk.leaves):
            # no gradient on a leaf: no later chunk used it (the last chunk), or it does not matter
            if leaf_k.grad is not None and k.requires_grad:
                outputs.append(k), grads.append(leaf_k.grad)
            if leaf_v.grad is not None and v.requires_grad:
                outputs.append(v), grads.append(leaf_v.grad)
        if chunk.loss.requires_grad or len(outputs) > 1:
            torch.autograd.backward(outputs, grads)

    @property
    def done(self) -> bool:
        return not self.to_forward and not self.chunks
