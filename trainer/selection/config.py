"""The `selection:` config section: what `train.py select` and `train.py pipeline` read.

Validated with the rest of the config (trainer/config.py holds one field line for it), so an
unknown or mistyped key is refused with its YAML line before anything loads.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

METHODS = ("got_d", "random", "nearest", "dsir")
# Methods that compare embeddings (the others read the text only and skip embedding).
EMBEDDING_METHODS = ("got_d", "nearest")
DEFAULT_EMBEDDER = "packaged:all-minilm-l6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextSource(_Section):
    path: str = Field(description="any data path the trainer reads, or packaged:NAME")
    max_rows: Optional[int] = Field(None, ge=1, description="read only the first N rows")


class PoolSource(TextSource):
    name: Optional[str] = Field(None, description="the source tag in the output (default: the corpus or file name)")


class OTOptions(_Section):
    epsilon: float = Field(0.1, gt=0, description="entropic regularisation, in squared-distance units")
    tol: float = Field(1e-3, gt=0, description="stop when the L1 marginal error is below this")
    max_iter: int = Field(1000, ge=1)
    momentum: float = Field(1.0, ge=1, lt=2, description="over-relaxation (ott-jax's Momentum); 1 = plain Sinkhorn")
    block_size: Optional[int] = Field(None, ge=1, description="candidates per block (default: ~64 MiB blocks)")
    max_kernel_gb: float = Field(4.0, ge=0, description="hold the kernel in memory up to this size; beyond, "
                                 "recompute it from the points every iteration")
    dtype: Literal["float32", "float64"] = "float32"


class PrefilterOptions(_Section):
    keep: int = Field(2, ge=1, description="keep the sources with the smallest OT distance to the target")
    sample: int = Field(2000, ge=2, description="chunks sampled per source to measure it")


class DSIROptions(_Section):
    ngrams: int = Field(2, ge=1, description="hashed unigrams .. n-grams")
    buckets: int = Field(10000, ge=16, description="hash buckets")
    top_k: bool = Field(False, description="take the top importance weights instead of Gumbel top-k sampling")


class RayOptions(_Section):
    address: Optional[str] = Field(None, description="ray.init address (also RAY_ADDRESS); unset: a local Ray")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the local Ray (unset: all)")
    workers: int = Field(2, ge=1, description="embedding actors")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class StageOptions(_Section):
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value for this stage only")


class WarmupOptions(StageOptions):
    epochs: float = Field(1.0, gt=0, description="passes over the selection (sets train.max_steps)")


class SelectionConfig(_Section):
    pool: list[Union[str, PoolSource]] = Field(default_factory=list, description="candidate sources")
    target: Union[str, TextSource, None] = Field(None, description="the small target set (default: data.path)")
    budget: Union[int, float] = Field(1000, gt=0, description="chunks to select, or a fraction (< 1) of the pool")
    method: Literal["got_d", "random", "nearest", "dsir"] = "got_d"
    embedder: str = Field(DEFAULT_EMBEDDER, description="packaged:NAME, a local folder, a hub id, tiny:bert, "
                          "or `model` (the model being tuned, mean-pooled)")
    embed_batch_size: int = Field(32, ge=1)
    embed_max_length: int = Field(256, ge=8, description="tokens per chunk for the embedder")
    normalize: bool = Field(True, description="L2-normalise embeddings (as sentence-transformers does)")
    chunk_chars: int = Field(1000, ge=0, description="characters per chunk (0: whole documents)")
    min_chars: int = Field(1, ge=1, description="drop shorter chunks")
    engine: Literal["local", "ray"] = "local"
    ray: RayOptions = Field(default_factory=RayOptions)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="for embedding and the OT solve")
    cache_dir: Optional[str] = Field(None, description="embedding cache (default: ~/.cache/peftforge/embeddings)")
    cache_flush_every: int = Field(1024, ge=1, description="embeddings per cache shard: what a kill can lose")
    output_dir: Optional[str] = Field(None, description="default runs/select (pipeline: <train.output_dir>/select)")
    seed: int = 0
    overwrite: bool = False
    ot: OTOptions = Field(default_factory=OTOptions)
    prefilter: Optional[PrefilterOptions] = Field(None, description="per-source OT pre-filter (unset: off)")
    dsir: DSIROptions = Field(default_factory=DSIROptions)
    warmup: WarmupOptions = Field(default_factory=WarmupOptions)
    finetune: StageOptions = Field(default_factory=StageOptions)

    @field_validator("budget")
    @classmethod
    def _budget(cls, value):
        if isinstance(value, float) and not value.is_integer() and value >= 1:
            raise ValueError("must be a whole number of chunks, or a fraction below 1")
        return int(value) if isinstance(value, float) and value >= 1 else value

    def sources(self) -> list[PoolSource]:
        return [PoolSource(path=s) if isinstance(s, str) else s for s in self.pool]

    def target_source(self, default_path: str) -> TextSource:
        """The target; unset, the fine-tuning data (`data.path`), as in the paper (D_R)."""
        if self.target is None:
            return TextSource(path=default_path)
        return TextSource(path=self.target) if isinstance(self.target, str) else self.target
