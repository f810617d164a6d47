"""Ranking evaluation shared by retrieval and re-ranking: the held-out candidate pool, MRR@10 and
Recall@k, and a BM25 first stage that gives each query a fixed re-ranking candidate set.

The pool is every distinct held-out passage, so a bi-encoder ranks each query against all of
them (not against a handful of in-batch negatives, which would flatter every model). A query
may have several relevant passages (one question, several answers): all count. A passage that
is the query's own text is no candidate for it: in chained conversations every turn is also the
previous row's reply, and a bi-encoder would rank that copy first at cosine 1.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

RECALL_KS = (1, 5, 10)
MRR_AT = 10
BM25_K1, BM25_B = 1.2, 0.75


@dataclass
class Pool:
    queries: list[str]       # distinct held-out queries, in first-seen order
    passages: list[str]      # distinct held-out passages, in first-seen order
    relevant: torch.Tensor   # bool [queries, passages]: the pair occurs in the held-out rows
    excluded: torch.Tensor   # bool [queries, passages]: the query's own text, not relevant: no candidate


def held_out_pool(examples: list[dict], max_queries: int | None = None) -> Pool:
    """The pool of rendered `pairs` examples; `max_queries` caps the queries, never the passages."""
    queries = list(dict.fromkeys(e["query"] for e in examples))
    passages = list(dict.fromkeys(e["passage"] for e in examples))
    if max_queries is not None:
        queries = queries[:max_queries]
    q_index = {q: i for i, q in enumerate(queries)}
    p_index = {p: j for j, p in enumerate(passages)}
    relevant = torch.zeros(len(queries), len(passages), dtype=torch.bool)
    for e in examples:
        if e["query"] in q_index:
            relevant[q_index[e["query"]], p_index[e["passage"]]] = True
    excluded = torch.zeros_like(relevant)
    for i, q in enumerate(queries):
        if q in p_index and not relevant[i, p_index[q]]:
            excluded[i, p_index[q]] = True
    return Pool(queries, passages, relevant, excluded)


def ranking_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks=RECALL_KS, mrr_at: int = MRR_AT) -> dict[str, float]:
    """Mean over queries of MRR@`mrr_at` and Recall@k (the share of a query's relevant candidates
    in its top k) from `scores` [queries, candidates] and a boolean `relevant` of the same shape.

    Ties go against the model: among equal scores the non-relevant candidates rank first, so a
    model that scores everything alike earns nothing. A candidate scored -inf is padding (it ranks
    last); queries without any relevant candidate are skipped.
    """
    keep = relevant.any(dim=1)
    scores, relevant = scores[keep].float(), relevant[keep]
    if scores.shape[0] == 0:
        return {}
    # two stable sorts = sort by score (descending), ties: non-relevant first
    by_relevance = torch.argsort(relevant.to(torch.int8), dim=1, stable=True)
    by_score = torch.argsort(-scores.gather(1, by_relevance), dim=1, stable=True)
    ranked_relevant = relevant.gather(1, by_relevance.gather(1, by_score))
    first = ranked_relevant.to(torch.int8).argmax(dim=1)  # 0-based position of the first relevant
    reciprocal = torch.where(first < mrr_at, 1.0 / (first + 1).float(), torch.zeros_like(first, dtype=torch.float))
    out = {f"eval/mrr@{mrr_at}": float(reciprocal.mean())}
    total = relevant.sum(dim=1).float()
    for k in ks:
        out[f"eval/recall@{k}"] = float((ranked_relevant[:, :k].sum(dim=1) / total).mean())
    return out


def softmax_loss(scores: torch.Tensor, relevant: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over queries of -log(softmax mass of the relevant candidates): the InfoNCE / listwise
    loss over a whole candidate pool. -inf scores are no candidates; queries without a relevant
    candidate are skipped."""
    keep = relevant.any(dim=1)
    logits = scores[keep].double() / temperature
    relevant_logits = logits.masked_fill(~relevant[keep], float("-inf"))
    return float((logits.logsumexp(dim=1) - relevant_logits.logsumexp(dim=1)).mean())


def bm25_scores(queries: list[list[int]], documents: list[list[int]]) -> torch.Tensor:
    """Okapi BM25 (k1 = 1.2, b = 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))) of every query
    against every document, both given as token ids; [queries, documents]."""
    n = len(documents)
    avg_len = max(sum(map(len, documents)) / max(n, 1), 1e-9)
    postings: dict[int, list[tuple[int, int]]] = {}
    for d, doc in enumerate(documents):
        for term, tf in Counter(doc).items():
            postings.setdefault(term, []).append((d, tf))
    norm = [BM25_K1 * (1 - BM25_B + BM25_B * len(doc) / avg_len) for doc in documents]
    out = torch.zeros(len(queries), n, dtype=torch.float64)
    for i, query in enumerate(queries):
        for term, qtf in Counter(query).items():
            docs = postings.get(term, ())
            idf = math.log(1 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            for d, tf in docs:
                out[i, d] += qtf * idf * tf * (BM25_K1 + 1) / (tf + norm[d])
    return out


def rerank_candidates(pool: Pool, tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed candidate set of `size` passages per query: its relevant passages, then the BM25
    top-ranked others (hard negatives, as a first-stage retriever would hand a re-ranker).

    Returns (indices into pool.passages [queries, size], valid [queries, size]); slots beyond
    the pool's size are invalid padding.
    """
    def ids(texts):
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    lexical = bm25_scores(ids(pool.queries), ids(pool.passages))
    lexical[pool.relevant] = math.inf  # relevant ones first, then the best lexical matches
    lexical[pool.excluded] = -math.inf
    width = min(size, len(pool.passages))
    order = torch.argsort(-lexical, dim=1, stable=True)[:, :width]
    index = torch.zeros(len(pool.queries), size, dtype=torch.long)
    valid = torch.zeros(len(pool.queries), size, dtype=torch.bool)
    index[:, :width], valid[:, :width] = order, ~pool.excluded.gather(1, order)
    return index, valid
