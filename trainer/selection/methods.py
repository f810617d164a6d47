"""The selection methods, each a ranking of the candidate chunks, best first.

- got_d:   GOT-D (Kang et al. 2024): solve entropic OT between target and candidate embeddings and
           take the candidates with the most negative calibrated dual potential (the gradient of
           the OT distance w.r.t. the candidate's mass): those that move the pool toward the target.
- nearest: TAPT/c-like k-nearest neighbours: every target chunk's neighbours by cosine
           similarity (faiss, exact), taken round-robin (all first neighbours, then all second
           ones, ...), without repeats.
- dsir:    DSIR (Xie et al. 2023): hashed unigram+bigram bag-of-words models of target and pool
           (the authors' `data-selection` featuriser), importance weight log p_target(x) -
           log p_pool(x), resampled without replacement by Gumbel top-k.
- random:  uniform without replacement.

Plus the paper's optional domain pre-filter: the OT distance of each source (a sample of it) to
the target, keeping the closest sources.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.errors import UserError
from trainer.selection import ot


@dataclass
class Ranking:
    order: np.ndarray  # selected candidate indices, best first
    scores: np.ndarray  # one per candidate
    score_meaning: str
    info: dict = field(default_factory=dict)


def _device(device: str) -> torch.device:
    return torch.device(device)


def solve(target: np.ndarray, pool: np.ndarray, opts, device: str, what: str) -> ot.OTResult:
    """Entropic OT between target and pool embeddings; a solve that does not reach `opts.tol`
    is a user-facing error (a ranking from unconverged potentials would be silently wrong)."""
    dtype = torch.float64 if opts.dtype == "float64" else torch.float32
    x = torch.as_tensor(target, dtype=dtype, device=_device(device))
    y = torch.as_tensor(pool, dtype=dtype, device=_device(device))
    result = ot.sinkhorn(x, y, opts.epsilon, tol=opts.tol, max_iter=opts.max_iter, momentum=opts.momentum,
                         block_size=opts.block_size, max_kernel_bytes=int(opts.max_kernel_gb * 2**30))
    if not result.converged:
        raise UserError(f"the OT solve ({what}) did not converge: L1 marginal error {result.error:.3g} after "
                        f"{result.iterations} iterations (tol {opts.tol:g})", where="selection.ot",
                        hint="raise selection.ot.max_iter or selection.ot.epsilon, or loosen selection.ot.tol")
    return result


def ot_summary(result: ot.OTResult) -> dict:
    return {"transport_cost": result.transport_cost, "objective": result.objective, "error": result.error,
            "iterations": result.iterations, "converged": result.converged,
            "kernel_in_memory": result.kernel_in_memory, "block_size": result.block_size,
            "kernel_rebuilds": result.rebuilds, "log_domain_iterations": result.safe_iterations}


def got_d(pool: np.ndarray, target: np.ndarray, budget: int, opts, device: str) -> Ranking:
    result = solve(target, pool, opts, device, "target vs pool")
    gradient = ot.calibrated_gradient(result.g)
    order = ot.gradient_order(gradient)[:budget]
    return Ranking(order.cpu().numpy(), gradient.cpu().numpy(),
                   "calibrated OT gradient dOT/db_j (lower = moves the pool closer to the target; selected first)",
                   {"ot": ot_summary(result)})


def nearest(pool: np.ndarray, target: np.ndarray, budget: int) -> Ranking:
    import faiss

    pool_n = _unit(pool)
    target_n = _unit(target)
    index = faiss.IndexFlatIP(pool_n.shape[1])
    index.add(pool_n)
    k = min(len(pool_n), max(1, math.ceil(budget / len(target_n))))
    while True:
        sims, ids = index.search(target_n, k)
        order = _round_robin(sims, ids, budget)
        if len(order) >= budget or k == len(pool_n):
            break
        k = min(len(pool_n), 2 * k)  # repeats between targets left too few: look further
    best = faiss.IndexFlatIP(target_n.shape[1])
    best.add(target_n)
    score, _ = best.search(pool_n, 1)
    return Ranking(np.asarray(order[:budget]), score[:, 0],
                   "max cosine similarity to a target chunk (selection takes each target's neighbours round-robin)",
                   {"neighbours_searched": k})


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _round_robin(sims: np.ndarray, ids: np.ndarray, budget: int) -> list[int]:
    """Neighbour rank 1 of every target, then rank 2, ...; within a rank the more similar first;
    a candidate already taken is skipped."""
    taken, order = set(), []
    for rank in range(ids.shape[1]):
        for t in np.argsort(-sims[:, rank], kind="stable"):
            candidate = int(ids[t, rank])
            if candidate >= 0 and candidate not in taken:
                taken.add(candidate)
                order.append(candidate)
                if len(order) == budget:
                    return order
    return order


def ngram_features(texts: list[str], ngrams: int, buckets: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sparse hashed n-gram counts per text, by the featuriser of the DSIR authors' package
    (`data_selection`: WordPunct tokens, lower-cased, sha256 buckets; needs no NLTK data)."""
    from data_selection.hashed_ngram_dsir import get_ngram_counts, wpt

    out = []
    for text in texts:
        counts = get_ngram_counts(text, n=ngrams, num_buckets=buckets, tokenizer=wpt.tokenize)
        nonzero = np.flatnonzero(counts)
        out.append((nonzero, counts[nonzero].astype(np.float64)))
    return out


def dsir_log_weights(pool_texts: list[str], target_texts: list[str], ngrams: int, buckets: int) -> np.ndarray:
    """log importance weights: sum over the chunk's hashed n-grams of count * (log p_target -
    log p_pool), both bag-of-n-gram models fitted on all of target resp. pool (the package's
    estimator, with its 1e-8 smoothing)."""
    pool_features = ngram_features(pool_texts, ngrams, buckets)
    raw = np.zeros(buckets)
    for idx, values in pool_features:
        raw[idx] += values
    target = np.zeros(buckets)
    for idx, values in ngram_features(target_texts, ngrams, buckets):
        target[idx] += values
    log_diff = np.log(target / max(target.sum(), 1) + 1e-8) - np.log(raw / max(raw.sum(), 1) + 1e-8)
    return np.array([float(values @ log_diff[idx]) for idx, values in pool_features])


def dsir(pool_texts: list[str], target_texts: list[str], budget: int, opts, seed: int) -> Ranking:
    weights = dsir_log_weights(pool_texts, target_texts, opts.ngrams, opts.buckets)
    keys = weights if opts.top_k else weights + np.random.default_rng(seed).gumbel(size=len(weights))
    order = np.argsort(-keys, kind="stable")[:budget]
    how = "top-k" if opts.top_k else "Gumbel top-k sampling"
    return Ranking(order, weights, f"DSIR log importance weight (higher first; {how})", {})


def random(pool_size: int, budget: int, seed: int) -> Ranking:
    keys = np.random.default_rng(seed).random(pool_size)
    order = np.argsort(keys, kind="stable")[:budget]
    return Ranking(order, keys, "uniform random key (lower first)", {})


def source_distances(per_source: dict[str, np.ndarray], target: np.ndarray, opts, device: str) -> dict[str, float]:
    """The domain pre-filter's measure: OT distance (transport cost) of each source's sample to the target."""
    return {name: solve(target, sample, opts, device, f"pre-filter, source {name}").transport_cost
            for name, sample in per_source.items()}
