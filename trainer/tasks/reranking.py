"""Cross-encoder re-ranking: (query, passage) pairs through a one-logit classification head;
listwise softmax cross-entropy over each query's positive and the batch's other passages;
MRR@10, Recall@k and the listwise loss over a fixed BM25 candidate set per held-out query.

A micro-batch of B rows is scored as all B x B (query, passage) pairs, so `train.batch_size`
counts queries and each micro-batch runs B^2 sequences. One loss unit is one query.
"""
from __future__ import annotations

import torch

from trainer.objective import forward, in_batch_softmax_sum
from trainer.tasks.base import Task
from trainer.tasks.ranking import held_out_pool, ranking_metrics, rerank_candidates, softmax_loss
from trainer.tasks.retrieval import not_negatives

# Candidates per held-out query: its relevant passages, then BM25's best other ones.
RERANK_CANDIDATES = 20


class Reranking(Task):
    name = "reranking"
    batch_eval = False  # the held-out loss and metrics come from the fixed candidate sets

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.max_length = cfg.data.max_length

    def pairs(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        """Each (query, passage) as one sequence through the tokenizer's own pair template."""
        enc = self.tokenizer(queries, passages, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def collate(self, examples):
        queries, passages = [e["query"] for e in examples], [e["passage"] for e in examples]
        n = len(examples)
        grid = self.pairs([q for q in queries for _ in range(n)], passages * n)  # row-major: query i, passage j
        return {**grid, "excluded": not_negatives(queries, passages)}

    def forward_loss(self, model, batch):
        outputs = forward(model, batch)
        n = batch["excluded"].shape[0]
        return outputs, in_batch_softmax_sum(outputs.logits.reshape(n, n), 1.0, batch["excluded"])

    def units(self, batch):
        return int(batch["excluded"].shape[0])

    @torch.no_grad()
    def eval_metrics(self, accelerator, model, examples, batch_size, max_batches):
        pool = held_out_pool(examples, max_batches * batch_size if max_batches else None)
        index, valid = rerank_candidates(pool, self.tokenizer, RERANK_CANDIDATES)
        pairs = [(q, j) for q in range(len(pool.queries)) for j in index[q, valid[q]].tolist()]
        scores = torch.full(index.shape, float("-inf"))
        flat = []
        chunk = batch_size * batch_size  # as many sequences as a training micro-batch
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            batch = self.pairs([pool.queries[q] for q, _ in part], [pool.passages[j] for _, j in part])
            flat.append(forward(model, {k: v.to(accelerator.device) for k, v in batch.items()}).logits.reshape(-1).float().cpu())
        scores[valid] = torch.cat(flat) if flat else torch.zeros(0)
        relevant = pool.relevant.gather(1, index) & valid
        return {"eval/loss": softmax_loss(scores, relevant), **ranking_metrics(scores, relevant)}
