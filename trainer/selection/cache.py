"""On-disk embedding cache, keyed by (embedder, text hash): re-selecting with another budget,
method or pool does not embed a chunk twice, and an embedding run killed half-way resumes.

One folder per embedder identity (a hash of its key, with the key in meta.json). New vectors are
buffered and written as shards, `part-*/{hashes,vectors}.npy`, each written under a temporary
name and renamed into place, so a kill loses at most the unflushed buffer and never leaves a
half shard. Shards from concurrent writers get distinct names (time, pid).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

HASH_BYTES = 16


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:HASH_BYTES]


class EmbeddingCache:
    def __init__(self, root: Path, embedder_key: str, flush_every: int = 1024):
        self.dir = Path(root) / hashlib.sha256(embedder_key.encode()).hexdigest()[:24]
        self.key, self.flush_every = embedder_key, flush_every
        self._index: dict[bytes, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        self._pending_hashes: list[bytes] = []
        self._pending: list[np.ndarray] = []
        self.hits = self.misses = 0
        self._load()

    def _load(self) -> None:
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("part-*")):
            if not (shard / "hashes.npy").exists():
                continue
            hashes = _unpack(np.load(shard / "hashes.npy"))
            vectors = np.load(shard / "vectors.npy", mmap_mode="r")
            number = len(self._shards)
            self._shards.append(vectors)
            for row, h in enumerate(hashes):
                self._index.setdefault(h, (number, row))

    def __contains__(self, h: bytes) -> bool:
        return h in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, hashes: list[bytes]) -> list[int]:
        """Positions of the hashes not cached yet (first occurrence of each)."""
        seen, out = set(), []
        for i, h in enumerate(hashes):
            if h not in self._index and h not in seen:
                seen.add(h)
                out.append(i)
        return out

    def get(self, hashes: list[bytes]) -> np.ndarray:
        """Vectors for hashes that are all cached (flush first), in order, float32."""
        rows = [self._index[h] for h in hashes]
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(rows), self._shards[rows[0][0]].shape[1]), dtype=np.float32)
        for i, (shard, row) in enumerate(rows):
            out[i] = self._shards[shard][row]
        return out

    def add(self, hashes: list[bytes], vectors: np.ndarray) -> None:
        self._pending_hashes.extend(hashes)
        self._pending.append(np.asarray(vectors, dtype=np.float32))
        if len(self._pending_hashes) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending_hashes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            tmp_meta = self.dir / f".meta-{os.getpid()}.json"
            tmp_meta.write_text(json.dumps({"embedder": self.key}))
            os.replace(tmp_meta, meta)
        # raw bytes as uint8 rows: numpy's fixed-width bytes type would strip trailing zero bytes
        hashes = np.frombuffer(b"".join(self._pending_hashes), dtype=np.uint8).reshape(-1, HASH_BYTES)
        vectors = np.concatenate(self._pending, axis=0)
        name = f"part-{time.time_ns():020d}-{os.getpid()}"
        tmp = self.dir / f".tmp-{name}"
        tmp.mkdir()
        try:
            np.save(tmp / "vectors.npy", vectors)
            np.save(tmp / "hashes.npy", hashes)
            for file in tmp.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        number = len(self._shards)
        self._shards.append(np.load(self.dir / name / "vectors.npy", mmap_mode="r"))
        for row, h in enumerate(self._pending_hashes):
            self._index.setdefault(h, (number, row))
        self._pending_hashes, self._pending = [], []


def _unpack(array: np.ndarray) -> list[bytes]:
    raw = array.tobytes()
    return [raw[i:i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]
