"""`sdpa_varlen` (trainer.varlen_attention): attention one document at a time on packed rows gives
the logits and gradients of transformers' eager attention with its block-diagonal mask, and of a
separate forward of each document alone; unpacked and padded batches are unchanged."""
from __future__ import annotations

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import varlen_attention
from trainer.varlen_attention import NAME, document_sizes

warnings.filterwarnings("ignore", category=UserWarning)

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              vocab_size=200, use_cache=False)  # with a cache, transformers ignores packing (see trainer.models)
SIZES = ([9, 7, 8], [15, 1, 8])  # two packed rows; a one-token document too


def model(attn: str):
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def packed():
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(s) for s in sizes]) for sizes in SIZES])
    return ids, positions


def logits_and_grads(m, **inputs):
    m.zero_grad(set_to_none=True)
    logits = m(**inputs).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_document_sizes_follow_the_position_restarts():
    _, positions = packed()
    assert document_sizes(positions) == [9, 7, 8, 15, 1, 8]
    assert document_sizes(torch.arange(10).expand(3, 10).clone()) is None  # nothing packed


def test_packed_rows_equal_eager_block_mask_and_each_document_alone():
    ids, positions = packed()
    ours, ours_grads = logits_and_grads(model(NAME), input_ids=ids, position_ids=positions)
    eager, eager_grads = logits_and_grads(model("eager"), input_ids=ids, position_ids=positions)
    assert torch.allclose(ours, eager, atol=1e-5)
    for name in eager_grads:
        # a gradient element is a sum of terms as large as the tensor's largest: float-order noise
        # scales with that, not with the element (3.8e-6 seen on one of 512 elements, max 62)
        scale = float(eager_grads[name].abs().max())
        assert torch.allclose(ours_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6 * max(scale, 1.0)), name
    with torch.no_grad():  # independent reference: every document run on its own
        alone = model("eager")
        for row, sizes in enumerate(SIZES):
            start = 0
            for size in sizes:
                want = alone(input_ids=ids[row:row + 1, start:start + size]).logits[0]
                assert torch.allclose(ours[row, start:start + size], want, atol=1e-5)
                start += size


def test_padded_batches_and_generation_take_transformers_sdpa(monkeypatch):
    calls = []
    real = varlen_attention.attention_by_document
    monkeypatch.setattr(varlen_attention, "attention_by_document", lambda *a: calls.append(1) or real(*a))
    ids, _ = packed()
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        ours = model(NAME)(input_ids=ids, attention_mask=mask).logits
        sdpa = model("sdpa")(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(ours, sdpa) and not calls
        generated = model(NAME).generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model("sdpa").generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False))


def test_tokens_after_a_cached_past_see_the_past():
    """A chunk of several tokens after a cached past (chunked prefill, a fine-tuning chunk): the
    logits of one forward over the whole sequence, as with transformers' own SDPA."""
    from transformers import DynamicCache

    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    m = model(NAME)
    with torch.no_grad():
        whole = m(input_ids=ids).logits
        cache = DynamicCache(config=m.config)
        first = m(input_ids=ids[:, :12], past_key_values=cache, use_cache=True).logits
        rest = m(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(12, 20).expand(2, -1)).logits
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-5)


def test_documents_run_the_cpu_flash_kernel_not_the_math_path():
    """The point of attending per document on the CPU is the flash kernel (no [n, n] scores held,
    GQA read directly); SDPA takes it only for 4-D inputs and silently falls back to the math path
    for 3-D ones, which the profiler tells apart."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(1, 4, 10, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 10, 8, requires_grad=True) for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        varlen_attention.attention_by_document(q, k, v, positions, 0.0, None).sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
