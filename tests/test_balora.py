"""BA-LoRA: regularisers against direct computations, the exact original-model teacher under PiSSA,
export to a LoRA adapter for the original base model, resume, and a short training loop."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import ValidationError
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import adapters.balora as balora
from adapters.balora import regularizers as R
from adapters.base import ADAPTERS, BuildContext

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)

LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)
BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
            max_position_embeddings=64, num_labels=3)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**BERT)).eval()


def build(model=None, task="causal_lm", total_steps=20, **options):
    model = model if model is not None else tiny_llama()
    return ADAPTERS["balora"].build(model, balora.BaLoraOptions(**options), BuildContext(task, total_steps, 0))


def tokens(seed=0, batch=4, length=12):
    return torch.randint(0, LLAMA["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb_adapter(peft_model, seed=1, std=0.05):
    """Stand-in for training: move every trainable LoRA weight away from its PiSSA init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


# ----- direct references (numpy, float64) ------------------------------------------------------------
def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_consistency(student, teacher, t):
    p, q = np_softmax(teacher / t), np_softmax(student / t)
    return t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))


def ref_topk_entropy(z, k):
    rows = []
    for row in z:
        top = np.sort(row)[::-1][:k] if k else row
        p = np_softmax(top)
        rows.append(-np.sum(p * np.log(p)))
    return -np.mean(rows)


def ref_covariance(z):
    cov = np.cov(z, rowvar=False)
    return (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / z.shape[1]


def ref_svd(z, k, normalizer):
    sigma = torch.linalg.svdvals(torch.as_tensor(z, dtype=torch.float64)).numpy()
    denom = np.sqrt(np.sum(z**2)) if normalizer == "frobenius" else sigma.sum()
    return -sigma[:k].sum() / denom


# ----- regularisers ----------------------------------------------------------------------------------
def test_regularisers_match_direct_computations():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 50, generator=g) * 3, torch.randn(9, 50, generator=g) * 3
    s64, t64 = student.double().numpy(), teacher.double().numpy()
    for t in (1.0, 2.0, 0.5):
        assert float(R.consistency(student, teacher, t)) == pytest.approx(ref_consistency(s64, t64, t), rel=1e-4)
    for k in (20, 5, 0):
        assert float(R.topk_entropy_diversity(student, k)) == pytest.approx(ref_topk_entropy(s64, k), rel=1e-5)
    for k, norm in [(10, "frobenius"), (3, "sum"), (1, "frobenius")]:
        assert float(R.svd_ratio(student, k, norm)) == pytest.approx(ref_svd(s64, k, norm), rel=1e-5)
    nlu = torch.randn(16, 4, generator=g)
    assert float(R.covariance_diversity(nlu)) == pytest.approx(ref_covariance(nlu.double().numpy()), rel=1e-4)
    assert float(R.covariance_diversity(nlu[:1])) == 0.0
    assert float(R.svd_ratio(torch.zeros(4, 6), 2, "sum")) == 0.0


def test_randomized_svd_path_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30, 3, generator=g) @ torch.randn(3, 200, generator=g)  # rank 3 < q = k + 5
    exact = ref_svd(z.double().numpy(), 2, "frobenius")
    assert float(R.svd_ratio(z, 2, "frobenius", randomized_above=100)) == pytest.approx(exact, rel=1e-4)


def test_weight_schedules_follow_their_formulas():
    assert R.consistency_weight(0.5, 37, 100, "constant", 0.1) == 0.5
    for step in (0, 25, 50, 100):
        expected = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 100)))
        assert R.consistency_weight(0.5, step, 100, "cosine", 0.1) == pytest.approx(expected)
    assert R.consistency_weight(0.5, 100, 100, "cosine", 0.1) == pytest.approx(0.05)
    two = dict(total_steps=100, schedule="two_phase", delay=0.2, ramp=0.05)
    assert [R.focus_weight(0.4, s, **two) for s in (0, 19, 20, 22.5, 25, 80)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.2, 0.4, 0.4])


def test_options_and_form_defaults():
    with pytest.raises(ValidationError):
        balora.BaLoraOptions(lamda_svd=0.1)
    assert balora.BaLoraOptions.model_fields["lambda_svd"].description
    nlg = balora.config.resolve(balora.BaLoraOptions(), "causal_lm")
    nlu = balora.config.resolve(balora.BaLoraOptions(lambda_svd=0.2), "sequence_classification")
    assert (nlg.form, nlg.lambda_consistency, nlg.svd_top_k, nlg.svd_normalizer, nlg.shift_labels) == (
        "nlg", 0.025, 10, "frobenius", True)
    assert (nlu.form, nlu.lambda_consistency, nlu.lambda_svd, nlu.svd_top_k, nlu.svd_normalizer) == (
        "nlu", 0.15, 0.2, 5, "sum")


# ----- the original-model teacher --------------------------------------------------------------------
def test_pissa_teacher_equals_the_unmodified_model_and_leaves_training_intact():
    original = tiny_llama()
    peft_model, hooks = build(model=copy.deepcopy(original))
    x = tokens()
    with torch.no_grad():
        expected = original(input_ids=x).logits
        with peft_model.disable_adapter():  # PiSSA: the bare residual model is NOT the original
            assert not torch.allclose(peft_model(input_ids=x).logits, expected, atol=1e-3)
    perturb_adapter(peft_model)
    peft_model.train()

    # gradients with a teacher forward between forward and backward == gradients without it
    def grads(call_teacher):
        peft_model.zero_grad()
        out = peft_model(input_ids=x, labels=x)
        if call_teacher:
            teacher = hooks.initial.original_forward(input_ids=x).logits
        out.loss.backward()
        return [p.grad.clone() for p in peft_model.parameters() if p.requires_grad], (
            teacher if call_teacher else None)

    plain, _ = grads(False)
    with_teacher, teacher = grads(True)
    assert torch.allclose(teacher, expected, atol=1e-5)  # W_res + s B0 A0 = W, to fp32 rounding
    assert all(torch.equal(a, b) for a, b in zip(plain, with_teacher))
    assert peft_model.training and all(m.training for m in peft_model.modules())
    lora_a = next(m for n, m in peft_model.named_modules() if n.endswith("q_proj")).lora_A["default"]
    assert lora_a.weight.requires_grad  # the live modules are back in place


def test_nlu_teacher_is_the_original_backbone_with_the_current_head():
    original = tiny_bert()
    peft_model, hooks = build(model=copy.deepcopy(original), task="sequence_classification")
    perturb_adapter(peft_model, std=0.5)  # a KL well above fp32 rounding
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():  # a trained-looking head, so the class logits are far from uniform
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(2)))
    reference = copy.deepcopy(original)
    reference.classifier.load_state_dict(head.state_dict())
    x = tokens(length=8)
    with torch.no_grad():
        teacher = hooks.initial.original_forward(input_ids=x).logits
        assert torch.allclose(teacher, reference(input_ids=x).logits, atol=1e-5)
    labels = torch.tensor([0, 1, 2, 1])
    peft_model.train()
    out = peft_model(input_ids=x, labels=labels)
    losses = hooks.extra_losses({"input_ids": x, "labels": labels}, out, peft_model)
    z, t = out.logits.detach().double().numpy(), teacher.double().numpy()
    assert float(losses["reg/consistency"].detach()) == pytest.approx(0.15 * ref_consistency(z, t, 2.0), rel=1e-3)
    assert float(losses["reg/diversity"].detach()) == pytest.approx(0.03 * ref_covariance(z), rel=1e-4)
    assert float(losses["reg/svd"].detach()) == pytest.approx(0.03 * ref_svd(z, 5, "sum"), rel=1e-4)


def test_nlg_losses_use_the_shifted_valid_tokens_and_the_original_model():
    original = tiny_llama()
    peft_model, hooks = build(model=copy.deepcopy(original), entropy_top_k=7)
    perturb_adapter(peft_model)
    x = tokens()
    labels = x.clone()
    labels[:, :5] = -100  # prompt tokens carry no loss
    labels[0, -1] = -100
    with torch.no_grad():
        out = peft_model(input_ids=x, labels=labels)
        losses = hooks.extra_losses({"input_ids": x, "labels": labels}, out, peft_model)
        keep = (labels[:, 1:] != -100)
        z = out.logits[:, :-1][keep].double().numpy()
        t = original(input_ids=x).logits[:, :-1][keep].double().numpy()
    assert z.shape[0] == int(keep.sum()) == 4 * 7 - 1  # 7 label tokens per row, one masked
    assert float(losses["reg/consistency"]) == pytest.approx(0.025 * ref_consistency(z, t, 2.0), rel=1e-4)
    assert float(losses["reg/diversity"].detach()) == pytest.approx(0.005 * ref_topk_entropy(z, 7), rel=1e-5)
    assert float(losses["reg/svd"].detach()) == pytest.approx(0.005 * ref_svd(z, 10, "frobenius"), rel=1e-5)


def test_zero_weighted_terms_are_zero_and_follow_the_schedule():
    peft_model, hooks = build(focus_schedule="two_phase", total_steps=10)
    x = tokens()
    out = peft_model(input_ids=x, labels=x)
    losses = hooks.extra_losses({"input_ids": x, "labels": x}, out, peft_model)
    assert float(losses["reg/diversity"].detach()) == 0.0 and float(losses["reg/svd"].detach()) == 0.0
    assert float(losses["reg/consistency"].detach()) == pytest.approx(0.0, abs=1e-6)  # adapter still at its init
    hooks.after_optimizer_step(5, peft_model)
    assert hooks.metrics() == {"balora/lambda_consistency": 0.025, "balora/lambda_diversity": 0.005,
                               "balora/lambda_svd": 0.005}


# ----- saving ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_save_adapter_reloads_onto_the_original_model_and_merges(tmp_path, arch):
    original = tiny_llama() if arch == "llama" else tiny_bert()
    task = "causal_lm" if arch == "llama" else "sequence_classification"
    peft_model, _ = build(model=copy.deepcopy(original), task=task)
    perturb_adapter(peft_model, std=0.2)
    peft_model.eval()
    x = tokens(length=8)
    with torch.no_grad():
        trained = peft_model(input_ids=x).logits
        assert not torch.allclose(trained, original(input_ids=x).logits, atol=1e-3)
    balora.save_adapter(peft_model, str(tmp_path))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].r == 16 and reloaded.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, trained, atol=1e-5)
        assert torch.allclose(reloaded.merge_and_unload()(input_ids=x).logits, trained, atol=1e-5)
        assert torch.allclose(peft_model.merge_and_unload()(input_ids=x).logits, trained, atol=1e-5)


def test_resume_restores_the_initial_adapter_and_re_anchors_the_residual():
    original = tiny_llama()
    x = tokens()
    with torch.no_grad():
        expected = original(input_ids=x).logits
    run, hooks = build(model=copy.deepcopy(original))
    perturb_adapter(run)
    hooks.after_optimizer_step(7, run)
    state = copy.deepcopy(hooks.state_dict())
    weights = copy.deepcopy(get_peft_model_state_dict(run))
    with torch.no_grad():
        trained = run(input_ids=x).logits
    # another machine's SVD could give slightly different (A0, B0): emulate with a perturbed copy
    g = torch.Generator().manual_seed(9)
    for factors in state["initial"].values():
        factors["A"] += torch.randn(factors["A"].shape, generator=g) * 1e-2
    resumed, hooks2 = build(model=copy.deepcopy(original))
    hooks2.load_state_dict(state)
    assert hooks2.step == 7
    with torch.no_grad():
        assert torch.allclose(hooks2.initial.original_forward(input_ids=x).logits, expected, atol=1e-5)
    # the perturbed A0 is now part of W_res, so the trained factors give a (slightly) different model;
    # with the exact saved factors the resumed model reproduces the trained logits
    resumed, hooks3 = build(model=copy.deepcopy(original))
    hooks3.load_state_dict(copy.deepcopy(hooks.state_dict()))
    set_peft_model_state_dict(resumed, weights)
    with torch.no_grad():
        assert torch.allclose(resumed(input_ids=x).logits, trained, atol=1e-5)


# ----- the loop -----------------------------------------------------------------------------------------
def test_training_loop_lowers_the_loss_with_all_regularisers():
    peft_model, hooks = build(total_steps=20, consistency_schedule="cosine")
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(seed=3)
    losses, logged = [], []
    for step in range(1, 21):
        out = peft_model(input_ids=x, labels=x)
        extra = hooks.extra_losses({"input_ids": x, "labels": x}, out, peft_model)
        loss = out.loss + sum(extra.values())
        loss.backward()
        optimizer.step()
        assert hooks.after_optimizer_step(step, peft_model) == []
        optimizer.zero_grad()
        losses.append(out.loss.item())
        logged.append({k: v.item() for k, v in extra.items()})
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert set(logged[-1]) == {"reg/consistency", "reg/diversity", "reg/svd"}
    assert all(np.isfinite(list(row.values())).all() for row in logged)
    assert logged[-1]["reg/consistency"] > 0  # the model moved away from the original
    assert hooks.metrics()["balora/lambda_consistency"] == pytest.approx(0.0025)
