"""Causal language modelling: next-token cross-entropy over the label tokens."""
from __future__ import annotations

from trainer.data.packing import Collator, count_loss_tokens
from trainer.objective import forward, token_loss_sum
from trainer.tasks.base import Task


class CausalLM(Task):
    name = "causal_lm"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.collate = Collator(tokenizer.pad_token_id, self.name, packed=cfg.data.packing)

    def forward_loss(self, model, batch):
        outputs = forward(model, batch)
        return outputs, token_loss_sum(outputs.logits, batch["labels"])

    def units(self, batch):
        return count_loss_tokens(batch["labels"])
