"""IAA ("Inside and Aside") and the bottleneck baseline: the pathway equations against a hand
computation, gradients reaching every inserted module (also with the frozen path cut), exact save
and reload, the refusal to merge."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType, get_peft_model

import adapters
from adapters.bottleneck import BottleneckConfig, BottleneckLayer
from adapters.iaa import IAAConfig, IAALayer, IAAOptions, build_iaa, pathway_layers
from trainer.models import load_model
from trainer.tasks.retrieval import embed


def _cfg(task="retrieval"):
    return SimpleNamespace(name_or_path="tiny:bert", task=task, num_labels=2, dtype="float32",
                           attn_implementation=None, temperature=0.05)


@pytest.fixture
def encoder(minilm_tokenizer):
    torch.manual_seed(0)
    return load_model(_cfg(), minilm_tokenizer).eval()


@pytest.fixture
def batch(minilm_tokenizer):
    enc = minilm_tokenizer(["what is the time", "hello there my friend", "ok"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _iaa(model, **kw):
    return get_peft_model(model, IAAConfig(task_type=TaskType.FEATURE_EXTRACTION, **kw))


def _perturb(model, scale=0.1, seed=1):
    """Random values in every trainable tensor (fresh up-projections are zero, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _bottleneck(module, h):
    return module.up(F.gelu(module.down(h)))


def test_inside_modules_sit_after_attention_and_ffn_outputs_and_start_as_the_base_model(encoder, batch):
    base_out = encoder(**batch).last_hidden_state
    model = _iaa(copy.deepcopy(encoder))
    layers = pathway_layers(model, "default")
    names = [n.split("layer.")[1] for n, m in model.named_modules() if isinstance(m, IAALayer)]
    assert names == ["0.attention.output.dense", "0.output.dense", "1.attention.output.dense", "1.output.dense"]
    assert [layer.iaa_position["default"] for layer in layers] == list(range(len(layers)))
    assert [layer.iaa_last["default"] for layer in layers] == [False] * (len(layers) - 1) + [True]
    d, r = encoder.config.hidden_size, 4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(layers) * 2 * (2 * d * r + d + r)
    torch.testing.assert_close(model(**batch).last_hidden_state, base_out)


def test_forward_matches_the_pathway_equations(encoder, batch):
    """y_l + d_l inside, s_l = a_l + Aside(a_l) with a_l = s_{l-1} + d_l, and y_L + s_L at the top."""
    model = _iaa(copy.deepcopy(encoder))
    _perturb(model)
    layers = pathway_layers(model, "default")
    frozen = {}
    hooks = [layer.base_layer.register_forward_hook(lambda m, i, o, k=k: frozen.__setitem__(k, o))
             for k, layer in enumerate(layers)]
    got = model(**batch).last_hidden_state
    for h in hooks:
        h.remove()

    # replay the network with the equations, feeding each frozen layer's real input
    expected_outputs, state = [], None
    for k, layer in enumerate(layers):
        y = frozen[k]
        d = _bottleneck(layer.iaa_inside["default"], y)
        a = d if state is None else state + d
        state = a + _bottleneck(layer.iaa_aside["default"], a)
        expected_outputs.append(y + (state if k == len(layers) - 1 else d))

    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, layer in enumerate(layers)]
    assert torch.equal(model(**batch).last_hidden_state, got)  # deterministic, state does not leak across passes
    for h in hooks:
        h.remove()
    for k in range(len(layers)):
        torch.testing.assert_close(outputs[k], expected_outputs[k], atol=1e-5, rtol=1e-5)


def _inserted_modules(model):
    return {f"{name}.{kind}": layer_dict["default"] for name, m in model.named_modules() if isinstance(m, IAALayer)
            for kind, layer_dict in (("inside", m.iaa_inside), ("aside", m.iaa_aside))}


def _embedding_loss(model, batch):
    e = embed(model, batch)
    return (e @ e.T / 0.05).logsumexp(-1).sum()


def test_one_backward_reaches_every_inserted_module(encoder, batch):
    model = _iaa(copy.deepcopy(encoder))  # default init: up-projections zero
    _embedding_loss(model, batch).backward()
    for name, module in _inserted_modules(model).items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    # after one update every single tensor receives gradient (the down-projections too)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.zero_grad()
    _embedding_loss(model, batch).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _cut_frozen_path(model):
    """Detach the hidden states entering every transformer layer after the first: gradient can no
    longer travel down through the frozen layers."""
    def detach(module, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    encoder_layers = model.base_model.model.encoder.layer
    return [layer.register_forward_pre_hook(detach, with_kwargs=True) for layer in list(encoder_layers)[1:]]


@pytest.mark.parametrize("pathway", ["chain", "none"])
def test_the_aside_pathway_carries_gradient_past_the_frozen_layers(encoder, batch, pathway):
    """With the frozen path cut above layer 0, the first inside module still learns through the
    pathway; scattered modules (pathway none) get nothing: this is the 'connected' claim."""
    model = _iaa(copy.deepcopy(encoder), pathway=pathway)
    _perturb(model)
    hooks = _cut_frozen_path(model)
    _embedding_loss(model, batch).backward()
    for h in hooks:
        h.remove()
    first = pathway_layers(model, "default")[0].iaa_inside["default"]
    reached = first.up.weight.grad is not None and first.up.weight.grad.abs().sum() > 0
    assert reached == (pathway == "chain")


def test_save_reload_gives_identical_embeddings(encoder, batch, tmp_path, minilm_tokenizer):
    model = _iaa(copy.deepcopy(encoder), r=4, aside_r=6)
    _perturb(model)
    expected = embed(model, batch)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = load_model(_cfg(), minilm_tokenizer).eval()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert reloaded.peft_config["default"].aside_r == 6
    assert torch.equal(embed(reloaded, batch), expected)


def test_reranker_head_trains_and_reloads(minilm_tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    base = load_model(_cfg("reranking"), minilm_tokenizer).eval()
    model = get_peft_model(copy.deepcopy(base), IAAConfig(task_type=TaskType.SEQ_CLS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("iaa_aside" in n for n in trainable)
    _perturb(model)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(reloaded(**batch).logits, expected)


@pytest.mark.parametrize("pathway", ["chain", "none"])
def test_merge_is_refused_with_a_reason(encoder, pathway):
    model = _iaa(copy.deepcopy(encoder), pathway=pathway)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


def test_gradient_checkpointing_is_refused(encoder):
    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient_checkpointing=false"):
        build_iaa(encoder, IAAOptions(), adapters.BuildContext("retrieval", 10, 0))


def test_targets_of_different_widths_are_refused(encoder):
    with pytest.raises(ValueError, match="same output width"):
        _iaa(encoder, target_modules=["intermediate.dense", "output.dense"])


def test_bottleneck_is_houlsby_placed_identity_at_start_and_reloads(encoder, batch, tmp_path, minilm_tokenizer):
    base_out = encoder(**batch).last_hidden_state
    model = get_peft_model(copy.deepcopy(encoder), BottleneckConfig(task_type=TaskType.FEATURE_EXTRACTION))
    names = sorted(n.split("layer.")[1] for n, m in model.named_modules() if isinstance(m, BottleneckLayer))
    assert names == ["0.attention.output.dense", "0.output.dense", "1.attention.output.dense", "1.output.dense"]
    torch.testing.assert_close(model(**batch).last_hidden_state, base_out)
    _perturb(model)
    layer = next(m for m in model.modules() if isinstance(m, BottleneckLayer))
    x = torch.randn(2, 3, layer.in_features)
    y = layer.base_layer(x)
    torch.testing.assert_close(layer(x), y + _bottleneck(layer.bottleneck_adapter["default"], y))
    expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(encoder), tmp_path)
    assert torch.equal(reloaded(**batch).last_hidden_state, expected)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        reloaded.merge_and_unload()
