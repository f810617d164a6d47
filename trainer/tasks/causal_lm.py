"""Causal language modelling: next-token cross-entropy over the label tokens.

Two ways to the same loss (tests/test_lm_loss.py checks that values and gradients agree):
  * loss positions (`train.logits: auto`, where it applies): the output layer and the loss only
    at the positions whose next token carries a label, in chunks (trainer.loss_positions,
    trainer.linear_ce); `forward_loss` then returns a `LossPositionOutputs`, not the model's;
  * full logits: the model's [batch, length, vocabulary] logits and a cross-entropy over them;
    `forward_loss` returns the model's outputs. Taken with `train.logits: full`, for optimizers
    that differentiate twice (AdaHessian: the chunked loss has no double backward), and where the
    check on the first batch finds the split does not reproduce the model (trainer.loss_positions).
On the loss-positions path a padded batch also runs padding-free (`train.padding_free`, on by default;
trainer.padding_free) when the model's attention keeps documents apart.
The choices are made once, on the first batch, and recorded in `notes` (the loop prints them).
"""
from __future__ import annotations

import optim
from trainer import padding_free
from trainer.data.packing import Collator, count_loss_tokens
from trainer.linear_ce import chunk_rows_for, linear_cross_entropy_sum
from trainer.loss_positions import (check_split, forward_at_positions, loss_positions, next_token_targets,
                                    output_layer)
from trainer.objective import forward, token_loss_sum
from trainer.tasks.base import Task

SPLIT_NOTE = "loss: lm_head and cross-entropy at the loss positions only, in chunks of {rows} rows"


class CausalLM(Task):
    name = "causal_lm"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.collate = Collator(tokenizer.pad_token_id, self.name, packed=cfg.data.packing)
        self.split: bool | None = None  # decided on the first batch
        self.padding_free = False
        self.fixed_reason = self._fixed_reason(cfg)

    @staticmethod
    def _fixed_reason(cfg) -> str | None:
        """Why the full-logits path is required by the configuration alone (None: it is not)."""
        if getattr(cfg.train, "logits", "auto") == "full":
            return "train.logits=full"
        if optim.OPTIMIZERS[cfg.optim.name].double_backward:
            return f"{cfg.optim.name} differentiates the loss twice; the chunked loss has no double backward"
        return None

    def _decide(self, model, batch) -> None:
        reason = self.fixed_reason or check_split(model, batch)
        self.split = reason is None
        if self.split:
            self.chunk_rows = chunk_rows_for(_vocab_size(output_layer(model)))
            self.notes.append(SPLIT_NOTE.format(rows=self.chunk_rows))
            # packed batches have no padding to remove (and no attention mask): nothing to say for them
            self.padding_free = (self.cfg.train.padding_free and "attention_mask" in batch
                                 and padding_free.applies(model))
            if self.padding_free:
                self.notes.append("padded batches run padding-free: the real tokens of all rows as one row of documents")
        else:
            self.notes.append(f"loss: full logits ({reason})")

    def loss_chunk_rows(self, model, batch) -> int | None:
        """Rows per lm_head chunk when the loss runs at the loss positions only (decided on the
        first batch, as `forward_loss` does), else None (the full-logits path)."""
        if self.split is None:
            self._decide(model, batch)
        return self.chunk_rows if self.split else None

    def forward_loss(self, model, batch):
        if self.split is None:
            self._decide(model, batch)
        if not self.split:
            outputs = forward(model, batch)
            return outputs, token_loss_sum(outputs.logits, batch["labels"])
        positions = loss_positions(batch["labels"])
        outputs = forward_at_positions(model, batch, positions, padding_free=self.padding_free)
        targets = next_token_targets(batch["labels"], positions)
        with outputs.autocast():
            loss = linear_cross_entropy_sum(outputs.hidden, outputs.head, targets, self.chunk_rows)
        return outputs, loss

    def units(self, batch):
        return count_loss_tokens(batch["labels"])


def _vocab_size(head) -> int:
    base = head.get_base_layer() if hasattr(head, "get_base_layer") else head  # inside a peft wrapper
    return base.weight.shape[0]
