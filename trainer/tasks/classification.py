"""Sequence classification: cross-entropy of the class logits; accuracy at evaluation."""
from __future__ import annotations

import torch

from trainer.data.packing import Collator
from trainer.objective import class_loss_sum, forward
from trainer.tasks.base import Task


class SequenceClassification(Task):
    name = "sequence_classification"
    count_names = ("eval/accuracy",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.collate = Collator(tokenizer.pad_token_id, self.name)

    def forward_loss(self, model, batch):
        outputs = forward(model, batch)
        return outputs, class_loss_sum(outputs.logits, batch["label"])

    def units(self, batch):
        return int(batch["label"].numel())

    def eval_counts(self, outputs, batch):
        return (outputs.logits.argmax(-1) == batch["label"]).sum().reshape(1)
