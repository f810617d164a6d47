"""`train.py select`: read pool and target, chunk, (pre-filter,) embed, rank, write the selection."""
from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.selection import methods
from trainer.selection.cache import EmbeddingCache
from trainer.selection.config import EMBEDDING_METHODS
from trainer.selection.corpus import Corpus, read_pool, read_target, resolve_budget
from trainer.selection.embed import EmbedderSpec, embed_texts, resolve_device
from trainer.selection.output import SUMMARY, check_output_dir, write

DEFAULT_OUTPUT = "runs/select"
# The keys that decide what is selected: a finished selection with the same values is reused by
# the pipeline; anything else (engine, batch sizes, cache place) changes only how it is computed.
DEFINING_KEYS = ("pool", "budget", "method", "embedder", "embed_max_length", "normalize", "chunk_chars",
                 "min_chars", "seed", "ot", "prefilter", "dsir")


def defining_config(cfg) -> dict:
    sel = cfg.selection.model_dump(mode="json")
    out = {key: sel[key] for key in DEFINING_KEYS}
    out["target"] = cfg.selection.target_source(cfg.data.path).model_dump(mode="json")
    out["embedder"] = embedder_model(cfg)
    return out


def embedder_model(cfg) -> str:
    return cfg.model.name_or_path if cfg.selection.embedder == "model" else cfg.selection.embedder


def output_dir(cfg) -> Path:
    return Path(cfg.selection.output_dir or DEFAULT_OUTPUT)


def select(cfg, out: Path | None = None) -> Path:
    """Run the selection described by `cfg.selection`; returns the output folder."""
    sel = cfg.selection
    out = Path(out) if out is not None else output_dir(cfg)
    check_output_dir(out, sel.overwrite)
    timings, began = {}, time.perf_counter()

    pool = read_pool(sel)
    target_path, target_texts = read_target(sel, cfg.data.path)
    if sel.prefilter is None:
        resolve_budget(sel.budget, len(pool))  # refuse an impossible budget before any embedding
    timings["read_and_chunk"] = time.perf_counter() - began

    needs_vectors = sel.method in EMBEDDING_METHODS or sel.prefilter is not None
    device = resolve_device(sel.device)
    embedder = _Embedding(cfg, device) if needs_vectors else None
    prefilter_info = None
    if sel.prefilter is not None:
        began = time.perf_counter()
        pool, prefilter_info = _prefilter(pool, target_texts, embedder, sel)
        timings["prefilter"] = time.perf_counter() - began
    budget = resolve_budget(sel.budget, len(pool))

    pool_vectors = target_vectors = None
    if sel.method in EMBEDDING_METHODS:
        began = time.perf_counter()
        target_vectors = embedder.embed(target_texts, "embed target")
        pool_vectors = embedder.embed(pool.texts, "embed pool")
        timings["embed"] = time.perf_counter() - began

    began = time.perf_counter()
    if sel.method == "got_d":
        ranking = methods.got_d(pool_vectors, target_vectors, budget, sel.ot, device)
    elif sel.method == "nearest":
        ranking = methods.nearest(pool_vectors, target_vectors, budget)
    elif sel.method == "dsir":
        ranking = methods.dsir(pool.texts, target_texts, budget, sel.dsir, sel.seed)
    else:
        ranking = methods.random(len(pool), budget, sel.seed)
    timings["rank"] = time.perf_counter() - began

    rows = [{"text": pool.texts[i], "source": pool.sources[i], "score": float(ranking.scores[i]), "rank": rank,
             "source_row": pool.rows[i]} for rank, i in enumerate(ranking.order.tolist(), start=1)]
    selected_counts = {name: 0 for name in pool.names}
    for row in rows:
        selected_counts[row["source"]] += 1
    summary = {
        "method": sel.method, "selected": len(rows), "budget": budget, "pool_chunks": len(pool),
        "target": target_path, "target_chunks": len(target_texts),
        "pool_counts": pool.counts(), "selected_counts": selected_counts,
        "score_meaning": ranking.score_meaning, **ranking.info,
        "prefilter": prefilter_info,
        "embedder": embedder.describe() if embedder else None,
        "engine": sel.engine if embedder else None, "device": device,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "config": defining_config(cfg), "selection_section": sel.model_dump(mode="json"),
        "versions": _versions(),
    }
    plot = {"scores": np.asarray(ranking.scores, dtype=np.float64), "selected": ranking.order,
            "pool_counts": pool.counts(), "selected_counts": selected_counts,
            "score_meaning": ranking.score_meaning, "method": sel.method}
    return write(out, rows, summary, plot)


class _Embedding:
    """The embedder and its cache for one run; loads the model only if something is not cached."""

    def __init__(self, cfg, device: str):
        from trainer.models import cache_root, resolve_model

        sel = cfg.selection
        model = embedder_model(cfg)
        try:
            resolve_model(model)  # a missing folder or unknown packaged model fails here, before any work
        except UserError as e:
            raise UserError(f"cannot load the embedder: {e.what}", where=f"selection.embedder={model}",
                            hint=e.hint) from None
        self.spec = EmbedderSpec(model, sel.embed_max_length, sel.normalize, sel.embed_batch_size, device)
        root = Path(sel.cache_dir) if sel.cache_dir else cache_root() / "embeddings"
        self.cache = EmbeddingCache(root, self.spec.key(), sel.cache_flush_every)
        self.engine, self.ray = sel.engine, sel.ray
        self.dim = None

    def embed(self, texts: list[str], describe: str) -> np.ndarray:
        vectors = embed_texts(texts, self.spec, self.cache, self.engine, self.ray, describe)
        self.dim = vectors.shape[1]
        return vectors

    def describe(self) -> dict:
        return {"model": self.spec.model, "dim": self.dim, "max_length": self.spec.max_length,
                "normalize": self.spec.normalize, "cache": str(self.cache.dir),
                "cache_hits": self.cache.hits, "embedded": self.cache.misses}


def _prefilter(pool: Corpus, target_texts: list[str], embedder: _Embedding, sel) -> tuple[Corpus, dict]:
    """The paper's domain test: OT distance from a seeded sample of each source to the target;
    the `keep` closest sources stay in the pool."""
    opts = sel.prefilter
    rng = np.random.default_rng(sel.seed)
    target = embedder.embed(target_texts, "embed target")
    distances, samples = {}, {}
    for name in pool.names:
        members = [i for i, s in enumerate(pool.sources) if s == name]
        picked = sorted(rng.choice(members, size=min(opts.sample, len(members)), replace=False).tolist())
        samples[name] = embedder.embed([pool.texts[i] for i in picked], f"embed sample of {name}")
    distances = methods.source_distances(samples, target, sel.ot, embedder.spec.device)
    kept = sorted(distances, key=distances.get)[:opts.keep]
    keep = [i for i, s in enumerate(pool.sources) if s in kept]
    info = {"distances": distances, "kept": kept, "sample": opts.sample, "chunks_before": len(pool),
            "chunks_after": len(keep)}
    return pool.subset(keep), info


def _versions() -> dict:
    out = {}
    for dist in ("torch", "POT", "faiss-cpu", "data-selection", "ray", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def finished(out: Path, cfg) -> bool:
    """Whether `out` holds a complete selection made with this config's defining keys."""
    import json

    summary = out / SUMMARY
    if not summary.exists():
        return False
    return json.loads(summary.read_text()).get("config") == defining_config(cfg)
