"""`model.attn_implementation: sdpa_varlen`: attention over packed rows one document at a time.

A packed row holds several documents; transformers keeps them apart with a block-diagonal
[B, 1, T, T] mask built from the position ids (they restart at 0 for every document). SDPA on
the CPU then computes the attention of every position against the whole row and masks most of it
away: at T = 512 with ~4 documents a row, about three quarters of the attention FLOPs and of its
backward are wasted, the mask costs the fast GQA path (K and V are repeated to every query
head), and the mask itself is built on every forward. Flash-attention's variable-length kernel
avoids this on CUDA; the CPU has none.

This implementation runs SDPA once per document, causal and without a mask (the CPU's flash
kernel then skips the upper triangle and reads K/V through GQA directly). The documents are
found from the position ids once per forward (every layer receives the same tensor). Batches
that are not packed (an attention mask, no restart in the positions, tokens after a cached past)
go to transformers' own SDPA path and mask unchanged, so the same model also evaluates, generates
and serves (chunked prefill).

It is registered with transformers' AttentionInterface (and a mask function that skips building
the dense mask when there is no padding mask) on import, so `from_pretrained(...,
attn_implementation="sdpa_varlen")` accepts it. tests/test_varlen_attention.py checks logits and
gradients against transformers' SDPA and eager attention on packed batches.
"""
from __future__ import annotations

import importlib.util
import inspect
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_varlen"

_last: dict = {"ids": None, "sizes": None}  # documents of the last position-id tensor seen


def document_sizes(position_ids: torch.Tensor) -> list[int] | None:
    """Lengths of the documents of all rows in row-major order (a row's end closes its last
    document); None when no row restarts its positions, i.e. nothing is packed."""
    ref = _last["ids"]
    if ref is not None and ref() is position_ids:
        return _last["sizes"]
    ids = position_ids.detach().cpu()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1  # transformers' rule (masking_utils.find_packed_sequence_indices)
    if not starts[:, 1:].any():
        sizes = None
    else:
        flat = torch.nonzero(starts.reshape(-1)).flatten().tolist() + [ids.numel()]
        sizes = [b - a for a, b in zip(flat, flat[1:])]
    _last.update(ids=weakref.ref(position_ids), sizes=sizes)
    return sizes


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), as transformers'
    attention functions return."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1:
        out = attention_by_document(query, key, value, position_ids, dropout, scaling)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@torch.compiler.disable  # the documents' sizes are data: under train.compile this part runs eagerly
def attention_by_document(query, key, value, position_ids, dropout: float, scaling) -> torch.Tensor | None:
    """Causal SDPA within each document of the packed rows; None when nothing is packed."""
    sizes = document_sizes(position_ids)
    if sizes is None:
        return None
    batch, heads, length, _ = query.shape
    # [B, H, T, D] -> [H, B*T, D]: the documents are consecutive slices of the token axis; split (not
    # repeated slicing) keeps the backward to one concatenation of the gradients
    flat = [t.transpose(0, 1).reshape(t.shape[1], batch * length, t.shape[-1]) for t in (query, key, value)]
    gqa = heads != key.shape[1]
    # each document as a batch of one, [1, H, n, D]: the CPU's flash kernel takes 4-D inputs only, and
    # 3-D ones fall back to the math path (the [H, n, n] scores materialised, masked and softmaxed)
    outs = [F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, scale=scaling, is_causal=True,
                                           enable_gqa=gqa)[0]
            for q, k, v in zip(*(t.split(sizes, dim=1) for t in flat))]
    out = torch.cat(outs, dim=1).reshape(heads, batch, length, value.shape[-1])
    return out.permute(1, 2, 0, 3).contiguous()


def packed_attention(mixed_precision: str = "no") -> str:
    """The attention for packed causal-LM batches when `model.attn_implementation` is unset.

    CUDA: flash-attention 2's variable-length kernel (transformers derives the documents from the
    position ids) where the flash_attn package is installed and the run is in bf16/fp16, which
    that kernel needs; else transformers' SDPA with the block-diagonal mask. CPU: this module.
    """
    if torch.cuda.is_available():
        if mixed_precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    return NAME


_MASK_ARGS = inspect.signature(sdpa_mask)


def varlen_mask(*args, attention_mask=None, **kwargs):
    """No dense mask when there is no padding mask and the queries are all the keys (no cached
    past): the attention finds the documents itself. Queries after a cached past (a prefill or a
    fine-tuning chunk continuing a sequence) need transformers' mask: without one SDPA's causal
    flag would align the queries with the first keys instead of the last."""
    bound = _MASK_ARGS.bind_partial(*args, attention_mask=attention_mask, **kwargs).arguments
    if attention_mask is None and bound.get("q_length") == bound.get("kv_length") and not bound.get("kv_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
