"""The engine's inference: continuous batching with one adapter per row, chunked prefill, sampling,
stop strings, cancellation. The reference is peft's own `generate` per request."""
from __future__ import annotations

import collections

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import model_cfg
from serving_harness import lively
from trainer.models import load_model
from trainer.serving.config import ServingConfig
from trainer.serving.cost import CostModel
from trainer.serving.engine import Engine
from trainer.serving.registry import Registry
from trainer.serving.request import Finished, GenRequest, Token
from trainer.serving.sampling import SamplingParams, choose

CHEAP = CostModel.fixed([0.001, 0.001, 0.0, 0.0001, 0.0], [0.001, 0.001, 0.0], [0.001, 0.001, 0.0])
PROMPTS = ["Hello there, how are you today", "The quick brown fox", "Once", "To be, or not to be, that is the question:",
           "x y z", "A much longer prompt that will need several prefill chunks before its first token comes out"]


def _served_model(tokenizer, spec="tiny:llama"):
    """The base with two random LoRA adapters of different ranks on different modules."""
    base = load_model(model_cfg(spec), tokenizer)
    if spec == "tiny:llama":
        lively(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]), adapter_name="user_0")
    model.add_adapter("user_1", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                           target_modules=["k_proj", "o_proj", "up_proj"]))
    with torch.no_grad():  # large enough that every adapter visibly changes the answers
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3 if spec == "tiny:llama" else 0.05)
    registry = Registry("base")
    registry.add_adapter("A", "user_0")
    registry.add_adapter("B", "user_1")
    return model.eval(), registry


def _reference(model, tokenizer, prompt, adapter, max_tokens):
    ids = torch.tensor([prompt])
    kwargs = {"adapter_names": [adapter]} if adapter else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _drive(engine, batches):
    """Submit batches[i] before iteration i, run to the end; returns the adapters seen per decode step."""
    seen, i = [], 0
    while True:
        for request in batches.get(i, []):
            engine.submit(request)
        stats = engine.step()
        seen.append({r.adapter for r in engine.decoding})
        i += 1
        if stats is None and i > max(batches):
            return seen


def _request(tokenizer, model, text, max_tokens, **params):
    events = []
    params.setdefault("temperature", 0)
    req = GenRequest(f"{model}-{text[:8]}-{max_tokens}", model, tokenizer(text)["input_ids"],
                     SamplingParams(max_tokens, **params), events.append)
    return req, events


def test_mixed_adapter_continuous_batching_equals_generate(smollm2_tokenizer):
    model, registry = _served_model(smollm2_tokenizer)
    engine = Engine(model, smollm2_tokenizer, registry, ServingConfig(prefill_chunk=7, max_running=4), cost=CHEAP)
    models = ["base", "A", "B", "A", "base", "B"]
    reqs = [_request(smollm2_tokenizer, m, p, 5 + 3 * i) for i, (m, p) in enumerate(zip(models, PROMPTS))]
    # arrivals while others decode: rows join a running batch and leave it at different lengths
    seen = _drive(engine, {0: [r for r, _ in reqs[:2]], 2: [reqs[2][0]], 3: [reqs[3][0], reqs[4][0]], 9: [reqs[5][0]]})
    assert max(len(s) for s in seen) == 3, "some decode steps should mix the base and both adapters"
    adapters = {"base": None, "A": "user_0", "B": "user_1"}
    for req, events in reqs:
        want = _reference(model, smollm2_tokenizer, req.prompt, adapters[req.model] or "__base__", req.params.max_tokens)
        assert req.output == want, req.model
        assert isinstance(events[-1], Finished) and events[-1].reason == "length"
        assert events[-1].completion_tokens == len(want) and events[-1].prompt_tokens == len(req.prompt)
        assert "".join(e.text for e in events if isinstance(e, Token)) == smollm2_tokenizer.decode(want, skip_special_tokens=True)
    assert engine.batch.rows == 0 and not engine.decoding


def test_bare_base_model_is_served_without_peft(smollm2_tokenizer):
    model = lively(load_model(model_cfg(), smollm2_tokenizer)).eval()
    engine = Engine(model, smollm2_tokenizer, Registry("base"), ServingConfig(prefill_chunk=4), cost=CHEAP)
    reqs = [_request(smollm2_tokenizer, "base", p, 6) for p in PROMPTS[:3]]
    _drive(engine, {0: [reqs[0][0], reqs[1][0]], 1: [reqs[2][0]]})
    for req, _ in reqs:
        assert req.output == _reference(model, smollm2_tokenizer, req.prompt, None, 6)


def test_stop_strings_cut_the_completion(smollm2_tokenizer):
    model, registry = _served_model(smollm2_tokenizer)
    engine = Engine(model, smollm2_tokenizer, registry, ServingConfig(), cost=CHEAP)
    prompt = PROMPTS[0]
    full = smollm2_tokenizer.decode(_reference(model, smollm2_tokenizer, smollm2_tokenizer(prompt)["input_ids"],
                                               "user_0", 20), skip_special_tokens=True)
    stop = full[8:11]
    assert len(stop) == 3 and 0 < full.index(stop) <= 8
    req, events = _request(smollm2_tokenizer, "A", prompt, 20, stop=["never-appears", stop])
    _drive(engine, {0: [req]})
    text = "".join(e.text for e in events if isinstance(e, Token))
    assert text == full[: full.index(stop)]
    assert events[-1].reason == "stop"


def test_seeded_sampling_does_not_depend_on_the_batch(smollm2_tokenizer):
    """temperature/top_p sampling with a seed, alone or among other requests, equals sampling the
    model's next-token logits directly with the same seeded generator."""
    model, registry = _served_model(smollm2_tokenizer)
    params = {"temperature": 0.9, "top_p": 0.8, "seed": 1234}
    alone, _ = _request(smollm2_tokenizer, "B", PROMPTS[1], 10, **params)
    crowd = [_request(smollm2_tokenizer, m, p, 8, temperature=1.0, seed=i) for i, (m, p) in
             enumerate(zip(["A", "base", "B"], PROMPTS[2:5]))]
    together, _ = _request(smollm2_tokenizer, "B", PROMPTS[1], 10, **params)
    _drive(Engine(model, smollm2_tokenizer, registry, ServingConfig(), cost=CHEAP), {0: [alone]})
    _drive(Engine(model, smollm2_tokenizer, registry, ServingConfig(prefill_chunk=3), cost=CHEAP),
           {0: [r for r, _ in crowd[:2]], 1: [together], 2: [crowd[2][0]]})
    generator, ids, want = SamplingParams(10, **params).generator(), list(alone.prompt), []
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=torch.tensor([ids]), adapter_names=["user_1"]).logits[0, -1]
            want.append(choose(logits, SamplingParams(10, **params), generator))
            ids.append(want[-1])
    assert alone.output == want and together.output == want


def test_top_p_follows_the_nucleus_formula():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    params = SamplingParams(1, temperature=0.7, top_p=0.75, seed=0)
    probs = torch.softmax(logits / 0.7, dim=0)
    keep = [0, 1]  # the smallest prefix of the sorted probabilities whose mass reaches 0.75
    assert probs[:1].sum() < 0.75 <= probs[:2].sum()
    want = torch.zeros(5)
    want[keep] = probs[keep] / probs[keep].sum()
    g = params.generator()
    counts = collections.Counter(choose(logits, params, g) for _ in range(20000))
    got = torch.tensor([counts[i] / 20000 for i in range(5)])
    torch.testing.assert_close(got, want, atol=0.015, rtol=0)
    assert choose(logits, SamplingParams(1, temperature=0.0), g) == 0


def test_cancel_frees_the_slot_and_the_pin(smollm2_tokenizer):
    model, registry = _served_model(smollm2_tokenizer)
    engine = Engine(model, smollm2_tokenizer, registry, ServingConfig(), cost=CHEAP)
    keep, _ = _request(smollm2_tokenizer, "A", PROMPTS[0], 12)
    gone, events = _request(smollm2_tokenizer, "A", PROMPTS[1], 50)
    waiting, _ = _request(smollm2_tokenizer, "B", PROMPTS[2], 50)
    engine.submit(keep), engine.submit(gone)
    for _ in range(3):
        engine.step()
    assert gone in engine.decoding
    engine.cancel(gone.id)
    engine.submit(waiting)
    engine.cancel(waiting.id)
    engine.step()
    assert gone not in engine.decoding and engine.batch.rows == len(engine.decoding) == 1
    while engine.step() is not None:
        pass
    assert keep.output == _reference(model, smollm2_tokenizer, keep.prompt, "user_0", 12)
    assert not any(isinstance(e, Finished) for e in events)
    assert all(n == 0 for n in registry._pins.values())


@pytest.mark.slow
def test_smollm2_mixed_adapter_batch_equals_generate(smollm2_tokenizer):
    """The same on the real SmolLM2-135M (30 layers, GQA 9/3 heads), chat prompts."""
    model, registry = _served_model(smollm2_tokenizer, "packaged:smollm2-135m-instruct")
    engine = Engine(model, smollm2_tokenizer, registry, ServingConfig(prefill_chunk=16), cost=CHEAP)
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?"]
    reqs = []
    for model_id, text in zip(["base", "A", "B"], chats):
        ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
        events = []
        reqs.append((GenRequest(model_id, model_id, list(ids), SamplingParams(24, temperature=0), events.append), events))
    _drive(engine, {0: [reqs[0][0]], 1: [reqs[1][0], reqs[2][0]]})
    for (req, events), adapter in zip(reqs, ["__base__", "user_0", "user_1"]):
        want = _reference(model, smollm2_tokenizer, req.prompt, adapter, 24)
        stop = [i for i, t in enumerate(want) if t in engine.eos]
        assert req.output == (want[:stop[0]] if stop else want)


def test_base_only_batches_skip_routing_and_leave_the_adapters_as_they_were(smollm2_tokenizer):
    """A batch of base rows runs with the adapted layers switched off for that call: its logits are
    those of the bare base model (a copy taken before peft wrapped it), and afterwards every
    adapter answers and trains as before (flags and requires_grad untouched)."""
    import copy

    from trainer.serving import lora

    bare = lively(load_model(model_cfg(), smollm2_tokenizer)).eval()
    reference = copy.deepcopy(bare)
    torch.manual_seed(2)
    model = get_peft_model(bare, LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])).eval()
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.tensor([smollm2_tokenizer("The quick brown fox")["input_ids"]] * 2)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with lora.routed(model, [lora.BASE, lora.BASE]) as kwargs:
            assert kwargs == {}  # no per-row routing
            base_rows = model(input_ids=ids, **kwargs).logits
        with lora.routed(model, [lora.BASE, "default"]) as kwargs:  # mixed: peft routes each row
            mixed = model(input_ids=ids, **kwargs).logits
        after = model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(base_rows, want)
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapter does change the answer
    torch.testing.assert_close(mixed[0], want[0])
    torch.testing.assert_close(mixed[1], adapted[1])
    torch.testing.assert_close(after, adapted)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
