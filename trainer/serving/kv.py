"""KV caches: the one module that reaches into transformers' cache objects.

transformers changes its cache API between releases (the forward's `past_key_values` became
`cache` in 5.24; `crop` flipped meaning in 5.x; the legacy tuple format is gone), so every use of
cache internals (`DynamicCache.layers[i].keys/.values`) lives here, behind four operations the
engine needs:

- a per-request cache for chunked prefill (`new_cache`);
- a cache built from given per-layer K/V, for a fine-tuning chunk whose past is a set of
  gradient-carrying leaves (`cache_from`), and the K/V a chunk added (`tail`);
- `BatchCache`: the decode batch, rows left-padded to one length so that each decode step is one
  forward with a 2-D attention mask and per-row positions (what `generate` does for a padded
  batch), with rows joining (their prefilled cache) and leaving (finished) between steps.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by (`cache` from transformers 5.24 on)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(inner).forward)


def new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise NotImplementedError("serving supports full-attention models only (no sliding-window or linear "
                                  "attention layers)")
    return cache


def cache_from(config, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding exactly these per-layer (keys, values) tensors, not copies: autograd flows
    from what the model computes with them back into them."""
    cache = new_cache(config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def tail(cache: DynamicCache, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The last `n` positions of every layer: what the latest forward of `n` tokens added."""
    return [(layer.keys[..., -n:, :], layer.values[..., -n:, :]) for layer in cache.layers]


def length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


class BatchCache:
    """The decode batch's KV cache: row r holds its real tokens right-aligned, padding on the left.

    `mask` is the 2-D attention mask of the cached positions (1 real, 0 padding) and `lengths` the
    real tokens per row, which is also the position of each row's next token.
    """

    def __init__(self, config):
        self.config = config
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def add(self, row_cache: DynamicCache) -> int:
        """Append a request's cache (batch of one) as the last row; returns its row index."""
        n = length(row_cache)
        if self.cache is None:
            self.cache = new_cache(self.config)
            for mine, theirs in zip(self.cache.layers, row_cache.layers, strict=True):
                mine.lazy_initialization(theirs.keys, theirs.values)
                mine.keys, mine.values = theirs.keys, theirs.values
            self.mask = torch.ones(1, n, dtype=torch.long)
            return 0
        width = max(self.width, n)
        self._left_pad(width)
        for mine, theirs in zip(self.cache.layers, row_cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([mine.values, _left_pad(theirs.values, width)], dim=0)
        row_mask = torch.cat([torch.zeros(width - n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        self.mask = torch.cat([self.mask, row_mask[None]], dim=0)
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding in every row."""
        if not rows:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]
        self.mask = mask[:, start:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask, position_ids) of a decode step that adds one token to every row."""
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        return mask, self.lengths[:, None]

    def stepped(self) -> None:
        """Record that the forward appended one real token to every row."""
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)

    def _left_pad(self, width: int) -> None:
        if width == self.width:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = _left_pad(layer.keys, width), _left_pad(layer.values, width)
        self.mask = F.pad(self.mask, (width - self.width, 0))


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the position axis (-2) of [B, H, T, D] on the left to `width`."""
    return F.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x
