"""TriAdaptLoRA: formulas checked against hand computations, peft save/load/merge, growth, resume."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import PeftType
from pydantic import ValidationError
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import adapters.triadaptlora as tri
from adapters.base import ADAPTERS, BuildContext

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)

LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def build(total_steps: int = 20, seed: int = 0, task: str = "causal_lm", model=None, **options):
    opts = tri.TriAdaptLoraOptions(**{"dropout": 0.0, **options})
    model = model if model is not None else tiny_llama()
    return ADAPTERS["triadaptlora"].build(model, opts, BuildContext(task, total_steps, seed))


def hand_core(layer, adapter: str = "default") -> np.ndarray:
    """L + U placed block by block with explicit index ranges (no padding code)."""
    sizes = [a.shape[0] for a in layer.triadaptlora_A[adapter]]
    r = sum(sizes)
    core = np.zeros((r, r))
    offset = 0
    for b, k in enumerate(sizes):
        r_b = offset + k  # rank after block b
        core[offset:r_b, :r_b] += layer.triadaptlora_L[adapter][b].detach().double().numpy()
        core[:r_b, offset:r_b] += layer.triadaptlora_U[adapter][b].detach().double().numpy()
        offset = r_b
    return core


def hand_delta(layer, alpha: float, adapter: str = "default") -> np.ndarray:
    a = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_A[adapter]], axis=0)
    b = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_B[adapter]], axis=1)
    return alpha / a.shape[0] * b @ hand_core(layer, adapter) @ a


def randomise(model, std: float = 0.3, seed: int = 1) -> None:
    """Give every adapter parameter (cores included) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "triadaptlora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def layers(peft_model):
    return peft_model.base_model.adapted_layers("default")


def tokens(seed: int = 0, batch: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ----- the update ----------------------------------------------------------------------------------
def test_delta_weight_and_forward_match_hand_computation():
    torch.manual_seed(0)
    layer = tri.TriAdaptLoraLinear(nn.Linear(6, 5), "default", blocks=[2, 3, 1], alpha=4.0, dropout=0.0)
    for b, (k, r_b) in enumerate([(2, 2), (3, 5), (1, 6)]):  # block shapes: L_b is k x r_b, U_b is r_b x k
        assert layer.triadaptlora_L["default"][b].shape == (k, r_b)
        assert layer.triadaptlora_U["default"][b].shape == (r_b, k)
    randomise(layer)
    expected = hand_delta(layer, alpha=4.0)
    assert np.allclose(layer.get_delta_weight("default").detach().double().numpy(), expected, atol=1e-6)
    # the code's core is the hand placement; below the block diagonal only L contributes, above only U
    core = layer.core("default").detach().double().numpy()
    assert np.allclose(core, hand_core(layer), atol=1e-7)
    assert np.allclose(core[2:5, :2], layer.triadaptlora_L["default"][1].detach().numpy()[:, :2])
    assert np.allclose(core[:2, 2:5], layer.triadaptlora_U["default"][1].detach().numpy()[:2, :])
    x = torch.randn(3, 6)
    base_out = layer.get_base_layer()(x)
    got = (layer(x) - base_out).detach().double().numpy()
    assert np.allclose(got, x.double().numpy() @ expected.T, atol=1e-6)


def hand_product(layer, adapter: str = "default") -> np.ndarray:
    """B (L + U) A without the scale."""
    a = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_A[adapter]], axis=0)
    b = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_B[adapter]], axis=1)
    return b @ hand_core(layer, adapter) @ a


@pytest.mark.parametrize("init_core", ["identity", "zero"])
def test_growth_keeps_the_product_and_current_rank_scaling_shrinks_it(init_core):
    torch.manual_seed(0)
    layer = tri.TriAdaptLoraLinear(nn.Linear(8, 7), "default", blocks=[1, 2], alpha=6.0, dropout=0.0,
                                   init_core=init_core)
    randomise(layer)
    product, before = hand_product(layer), layer.get_delta_weight("default").detach()
    new = layer.grow("default", 3)
    assert [tuple(p.shape) for p in new] == [(3, 8), (7, 3), (3, 6), (6, 3)]
    a_new, b_new, l_new, u_new = (p.detach().numpy() for p in new)
    assert np.count_nonzero(u_new) == 0 and np.count_nonzero(a_new) == a_new.size
    if init_core == "identity":  # B = 0 and the block's diagonal part of L is the identity
        assert np.count_nonzero(b_new) == 0
        assert np.array_equal(l_new, np.hstack([np.zeros((3, 3)), np.eye(3)]))
    else:  # A, B ~ N(0, 0.02), core zero
        assert np.count_nonzero(l_new) == 0 and np.count_nonzero(b_new) == b_new.size
    assert layer.rank("default") == 6
    # B (L+U) A is unchanged; alpha / r (current rank: no scale_rank) moves from 6/3 to 6/6
    assert np.allclose(hand_product(layer), product, atol=1e-7)
    assert torch.allclose(layer.get_delta_weight("default").detach(), before * 3 / 6, atol=1e-7)


def test_reference_rank_scaling_keeps_the_update_through_growth():
    layer = tri.TriAdaptLoraLinear(nn.Linear(8, 7), "default", blocks=[1], alpha=6.0, dropout=0.0, scale_rank=4)
    randomise(layer)
    before = layer.get_delta_weight("default").detach()
    assert np.allclose(before.double().numpy(), 6.0 / 4 * hand_product(layer), atol=1e-6)
    layer.grow("default", 3)
    assert layer.scaling("default") == 6.0 / 4
    assert torch.allclose(layer.get_delta_weight("default").detach(), before, atol=1e-7)


def test_defaults_start_as_lora_at_the_reference_scale():
    """The trainer's defaults: identity cores, B = 0 (dW = 0), scale alpha / r with r the reference rank."""
    peft_model, _ = build(r=4, alpha=8.0)
    for layer in layers(peft_model).values():
        assert layer.scaling("default") == 8.0 / 4
        assert np.array_equal(hand_core(layer), np.eye(1))
        assert torch.count_nonzero(layer.triadaptlora_B["default"][0]) == 0
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0


# ----- importance score and schedule ----------------------------------------------------------------
def test_importance_score_by_hand():
    peft_model, hooks = build(r=4)
    normalised = lambda: {k: np.linalg.norm(hand_core(layer), "fro") / len(layer.triadaptlora_A["default"])  # noqa: E731
                          for k, layer in layers(peft_model).items()}
    initial = normalised()  # identity cores of rank 1: 1.0 each
    randomise(peft_model, seed=3)
    by_hand = normalised()
    # the remembered value starts at the initial cores
    scores = hooks.importance_scores()
    assert scores.keys() == by_hand.keys()
    for k in by_hand:
        assert initial[k] == pytest.approx(1.0)
        assert scores[k] == pytest.approx(by_hand[k] - initial[k], rel=1e-5)
    # a second scoring reports the change since the first, normalised by the block count
    key, layer = next(iter(layers(peft_model).items()))
    layer.grow("default", 2)
    with torch.no_grad():
        layer.triadaptlora_L["default"][1].fill_(0.5)
    now = np.linalg.norm(hand_core(layer), "fro") / 2
    assert hooks.importance_scores()[key] == pytest.approx(now - by_hand[key], rel=1e-5)


@pytest.mark.parametrize("init_core", ["identity", "zero"])
def test_a_growth_step_is_not_counted_as_importance(init_core):
    """After the hooks grow matrices, the next score measures training only: with nothing trained
    in between it is zero for every matrix, grown or not."""
    peft_model, hooks = build(total_steps=10, r=4, init_core=init_core)
    _set_scores(peft_model, dict(zip(layers(peft_model), [0.3, 0.9, 0.1, 0.6])))
    assert hooks.after_optimizer_step(5, peft_model)  # grows
    assert any(len(layer.block_sizes("default")) > 1 for layer in layers(peft_model).values())
    assert all(v == pytest.approx(0.0, abs=1e-7) for v in hooks.importance_scores().values())


@pytest.mark.parametrize("remaining,progress,n_matrices", [
    (28, 0.05, 4), (28, 0.5, 4), (28, 0.5, 100), (3, 1.0, 10), (100, 0.0, 8), (7, 0.31, 50), (1, 0.9, 3),
])
def test_number_of_growing_matrices_follows_both_formulas(remaining, progress, n_matrices):
    linear = min(max(int(remaining * progress), 1), n_matrices)  # floor for non-negative values
    nonlinear = min(max(int(math.exp(progress * math.log(remaining)) + 1e-9), 1), n_matrices)
    assert tri.matrices_to_grow("linear", remaining, progress, n_matrices) == linear
    assert tri.matrices_to_grow("nonlinear", remaining, progress, n_matrices) == nonlinear


def _set_scores(peft_model, values: dict[str, float]) -> None:
    """Make ||L+U||_F / n_blocks equal the given value (single block: put it on one core entry)."""
    with torch.no_grad():
        for key, layer in layers(peft_model).items():
            layer.triadaptlora_L["default"][0].fill_(0.0)
            layer.triadaptlora_L["default"][0][0, 0] = values[key]


@pytest.mark.parametrize("mode,expected_grown", [("linear", 4), ("nonlinear", 3)])
def test_growth_step_picks_the_top_scores_by_threshold(mode, expected_grown):
    # 4 matrices, init rank 1, target 4 * 4 = 16, increments of r // 2 = 2, T = 10
    peft_model, hooks = build(total_steps=10, r=4, growth_mode=mode)
    keys = list(layers(peft_model))
    values = dict(zip(keys, [0.3, 0.9, 0.1, 0.6]))
    _set_scores(peft_model, values)
    new = hooks.after_optimizer_step(5, peft_model)  # p = 0.5, remaining = 12
    # linear: floor(12 * 0.5) = 6 -> clipped to 4; nonlinear: floor(12 ** 0.5) = 3
    ranked = sorted(keys, key=values.get, reverse=True)
    grown = ranked[:expected_grown]
    for key, layer in layers(peft_model).items():
        assert layer.block_sizes("default") == ([1, 2] if key in grown else [1])
    assert len(new) == 4 * expected_grown
    assert hooks.metrics()["adapter/total_rank"] == 4 + 2 * expected_grown
    assert peft_model.peft_config["default"].rank_pattern == {
        k: layer.block_sizes("default") for k, layer in layers(peft_model).items()}


def test_growth_is_clamped_at_the_budget_and_respects_warmup_and_interval():
    peft_model, hooks = build(total_steps=10, r=4, target_total_rank=7, init_warmup=2, incre_interval=2)
    keys = list(layers(peft_model))
    _set_scores(peft_model, dict(zip(keys, [0.4, 0.3, 0.2, 0.1])))
    assert hooks.after_optimizer_step(2, peft_model) == []  # inside the warm-up
    assert hooks.after_optimizer_step(3, peft_model) == []  # not on the interval
    hooks.after_optimizer_step(10, peft_model)  # p = 1: n = floor(3 * 1) = 3 candidates, budget 3
    sizes = [layers(peft_model)[k].block_sizes("default") for k in keys]
    assert sizes == [[1, 2], [1, 1], [1], [1]]  # 2, then the clamped 1, then nothing left
    assert hooks.metrics()["adapter/total_rank"] == 7
    assert hooks.after_optimizer_step(12, peft_model) == []  # at the target: no more growth


def test_orthogonality_penalty_by_direct_computation():
    peft_model, hooks = build(orth_reg_weight=0.3)
    randomise(peft_model, std=0.2)
    layers(peft_model)["model.layers.1.self_attn.v_proj"].grow("default", 2)
    norms = []
    for layer in layers(peft_model).values():
        a = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_A["default"]], axis=0)
        b = np.concatenate([p.detach().double().numpy() for p in layer.triadaptlora_B["default"]], axis=1)
        norms.append(np.linalg.norm(a @ a.T - np.eye(a.shape[0]), "fro"))
        norms.append(np.linalg.norm(b.T @ b - np.eye(b.shape[1]), "fro"))
    got = hooks.extra_losses({}, None, peft_model)["reg/orth"]
    assert got.requires_grad
    assert float(got.detach()) == pytest.approx(0.3 * np.mean(norms), rel=1e-5)


# ----- peft integration ------------------------------------------------------------------------------
def test_registered_with_peft_and_the_trainer():
    assert PeftType.TRIADAPTLORA == "TRIADAPTLORA" and "TRIADAPTLORA" in list(PeftType)
    assert ADAPTERS["triadaptlora"].options is tri.TriAdaptLoraOptions
    with pytest.raises(ValidationError):
        tri.TriAdaptLoraOptions(rank=4)
    assert tri.TriAdaptLoraOptions.model_fields["r"].description


def test_default_targets_for_llama_and_bert():
    peft_model, _ = build()
    assert {k.rsplit(".", 1)[-1] for k in layers(peft_model)} == {"q_proj", "v_proj"}
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
        max_position_embeddings=64, num_labels=3))
    peft_bert, hooks = build(model=bert, task="sequence_classification")
    assert {k.rsplit(".", 1)[-1] for k in layers(peft_bert)} == {"query", "value"}
    trainable = [n for n, p in peft_bert.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)  # the new head trains and is saved
    out = peft_bert(input_ids=tokens(length=8), labels=torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(out.loss + sum(hooks.extra_losses({}, out, peft_bert).values()))


def test_growth_then_save_and_from_pretrained_rebuilds_shapes_and_logits(tmp_path):
    peft_model, hooks = build(r=4)
    randomise(peft_model, seed=5)
    hooks.after_optimizer_step(1, peft_model)  # one growth event through the hooks ...
    layers(peft_model)["model.layers.0.self_attn.v_proj"].grow("default", 3)  # ... and one by hand
    randomise(peft_model, seed=6)  # grown blocks get non-zero values too
    pattern = {k: layer.block_sizes("default") for k, layer in layers(peft_model).items()}
    assert any(len(v) > 1 for v in pattern.values())
    x = tokens()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert reloaded.peft_config["default"].rank_pattern == pattern
    for key, layer in layers(reloaded).items():
        assert layer.block_sizes("default") == pattern[key]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, expected, atol=1e-6)


def test_merge_and_unload_and_unmerge_keep_logits():
    peft_model, hooks = build(r=4)
    randomise(peft_model, seed=2)
    hooks.after_optimizer_step(1, peft_model)
    randomise(peft_model, seed=4)
    x = tokens()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        base_only = tiny_llama()(input_ids=x).logits
        assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapter does something
        peft_model.merge_adapter()
        assert torch.allclose(peft_model(input_ids=x).logits, expected, atol=1e-5)
        peft_model.unmerge_adapter()
        assert torch.allclose(peft_model(input_ids=x).logits, expected, atol=1e-5)
        merged = peft_model.merge_and_unload()
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-5)


# ----- the loop ---------------------------------------------------------------------------------------
def _train(peft_model, hooks, optimizer, steps, start: int = 1, x=None):
    """The loop's calling convention: task + sum(extra_losses); grow after optimizer.step."""
    x = tokens(seed=7) if x is None else x
    losses = []
    for step in range(start, start + steps):
        out = peft_model(input_ids=x, labels=x)
        loss = out.loss + sum(hooks.extra_losses({"input_ids": x, "labels": x}, out, peft_model).values())
        loss.backward()
        optimizer.step()
        new = hooks.after_optimizer_step(step, peft_model)
        if new:
            optimizer.add_param_group({"params": new})
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def test_training_loop_lowers_the_loss_and_grows_the_rank():
    peft_model, hooks = build(total_steps=20, r=4, orth_reg_weight=0.1)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    rank0 = hooks.metrics()["adapter/total_rank"]
    losses = _train(peft_model, hooks, optimizer, 20)
    rank = hooks.metrics()["adapter/total_rank"]
    assert rank0 == 4 and rank0 < rank <= 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    grown = hooks.grown_param_ids()
    assert grown and grown <= in_optimizer
    assert len(optimizer.param_groups) == 1 + len(hooks.grown_param_groups())
    # grown blocks were trained (their B columns start at zero)
    assert any(torch.count_nonzero(layer.triadaptlora_B["default"][-1]) > 0
               for layer in layers(peft_model).values() if len(layer.triadaptlora_B["default"]) > 1)


def test_resume_regrows_before_weights_load_and_continues_identically():
    x = tokens(seed=7)
    run, hooks = build(total_steps=12, r=4, seed=3)
    run.train()
    opt = torch.optim.AdamW([p for p in run.parameters() if p.requires_grad], lr=1e-2)
    _train(run, hooks, opt, 4, x=x)
    # deep copy: like a checkpoint on disk, it must not share tensors with the live run
    checkpoint = copy.deepcopy({"hooks": hooks.state_dict(), "weights": get_peft_model_state_dict(run),
                                "optimizer": opt.state_dict()})

    # resume: build -> hooks.load_state_dict (regrows) -> load weights -> optimizer with the same groups
    resumed, hooks2 = build(total_steps=12, r=4, seed=3)
    resumed.train()
    hooks2.load_state_dict(checkpoint["hooks"])
    result = set_peft_model_state_dict(resumed, checkpoint["weights"])
    assert not [k for k in result.missing_keys if "triadaptlora_" in k]
    grown = hooks2.grown_param_ids()
    first = [p for p in resumed.parameters() if p.requires_grad and id(p) not in grown]
    opt2 = torch.optim.AdamW(first, lr=1e-2)
    for group in hooks2.grown_param_groups():
        opt2.add_param_group({"params": group})
    opt2.load_state_dict(checkpoint["optimizer"])

    _train(run, hooks, opt, 4, start=5, x=x)
    _train(resumed, hooks2, opt2, 4, start=5, x=x)
    assert hooks.state_dict()["rank_pattern"] == hooks2.state_dict()["rank_pattern"]
    a, b = get_peft_model_state_dict(run), get_peft_model_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
