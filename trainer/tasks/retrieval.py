"""Dense retrieval with a bi-encoder: mean-pooled, L2-normalised embeddings; InfoNCE over the
in-batch negatives; MRR@10, Recall@k and the InfoNCE loss against every held-out passage.

Query i's positive is passage i; the other passages of the micro-batch are its negatives
(with gradient accumulation or several processes, negatives come from the micro-batch only).
One loss unit is one query.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from trainer.objective import forward, in_batch_softmax_sum
from trainer.tasks.base import Task
from trainer.tasks.ranking import held_out_pool, ranking_metrics, softmax_loss


def not_negatives(queries: list[str], passages: list[str]) -> torch.Tensor:
    """[i, j] True where passage j (j != i) is no negative for query i: the same text as its
    passage, another answer to the same query, or the query's own text (in chained conversations
    a turn is also the previous row's reply, and a bi-encoder scores its copy at cosine 1)."""
    n = len(queries)
    rows = [[j != i and (passages[j] == passages[i] or queries[j] == queries[i] or passages[j] == queries[i])
             for j in range(n)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.bool).reshape(n, n)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (mask 1) tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embed(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states of one side of a batch ("query_", "passage_")."""
    hidden = forward(model, batch, prefix).last_hidden_state
    return F.normalize(mean_pool(hidden, batch[prefix + "attention_mask"]).float(), dim=-1)


class Retrieval(Task):
    name = "retrieval"
    batch_eval = False  # the held-out loss and metrics come from the whole pool

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.max_length, self.temperature = cfg.data.max_length, cfg.model.temperature

    def tokenize(self, texts: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {prefix + "input_ids": enc["input_ids"], prefix + "attention_mask": enc["attention_mask"]}

    def collate(self, examples):
        queries, passages = [e["query"] for e in examples], [e["passage"] for e in examples]
        return {**self.tokenize(queries, "query_"), **self.tokenize(passages, "passage_"),
                "excluded": not_negatives(queries, passages)}

    def forward_loss(self, model, batch):
        queries, passages = embed(model, batch, "query_"), embed(model, batch, "passage_")
        scores = queries @ passages.T  # cosine similarities
        # method hooks read `.logits`
        return SimpleNamespace(logits=scores), in_batch_softmax_sum(scores, self.temperature, batch["excluded"])

    def units(self, batch):
        return int(batch["query_input_ids"].shape[0])

    @torch.no_grad()
    def encode(self, model, texts: list[str], batch_size: int, device) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize(texts[start:start + batch_size]).items()}
            chunks.append(embed(model, batch))
        return torch.cat(chunks)

    @torch.no_grad()
    def eval_metrics(self, accelerator, model, examples, batch_size, max_batches):
        # every process ranks the whole pool (the same forwards everywhere; pools are small)
        pool = held_out_pool(examples, max_batches * batch_size if max_batches else None)
        queries = self.encode(model, pool.queries, batch_size, accelerator.device)
        passages = self.encode(model, pool.passages, batch_size, accelerator.device)
        scores = (queries @ passages.T).cpu().masked_fill(pool.excluded, float("-inf"))
        return {"eval/loss": softmax_loss(scores, pool.relevant, self.temperature),
                **ranking_metrics(scores, pool.relevant)}
