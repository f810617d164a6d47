"""Logits only where the loss is (trainer.loss_positions, trainer.linear_ce): the causal-LM loss and
its gradients equal the full-logits computation (one `F.cross_entropy` over the model's own
[batch, length, vocab] logits), through peft wrappers and for BA-LoRA's logit terms; the plain
path is taken, and said, where the split would not reproduce the model."""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import adapters.balora as balora
from adapters.base import ADAPTERS, BuildContext
from trainer.linear_ce import linear_cross_entropy_sum
from trainer.loss_positions import LossPositionOutputs
from trainer.objective import forward
from trainer.tasks.causal_lm import CausalLM

warnings.filterwarnings("ignore", category=UserWarning)

VOCAB = 300
LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=VOCAB, tie_word_embeddings=True, use_cache=False)  # as trainer.models loads them


def cfg(logits="auto", optimizer="adamw", packing=False, padding_free=True):
    """The config fields the causal-LM task reads."""
    return SimpleNamespace(data=SimpleNamespace(packing=packing),
                           train=SimpleNamespace(logits=logits, padding_free=padding_free),
                           optim=SimpleNamespace(name=optimizer))


TOKENIZER = SimpleNamespace(pad_token_id=0)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def padded_batch(seed=1):
    """3 rows, right-padded, prompts without labels, one row shorter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 14:] = -100
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(seed=2):
    """2 rows of 3 and 2 documents, positions restarting at 0, each document's first label -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 24), generator=g)
    pos, labels = [], ids.clone()
    for row, sizes in enumerate(([9, 7, 8], [15, 9])):
        start = 0
        for size in sizes:
            labels[row, start:start + 3] = -100  # first label and a 2-token prompt
            start += size
        pos.append(torch.cat([torch.arange(s) for s in sizes]))
    return {"input_ids": ids, "position_ids": torch.stack(pos), "labels": labels}


def reference_loss(model, batch):
    """The full-logits computation, written out: every position's logits, labels shifted."""
    logits = forward(model, batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-5), (float(a[0]), float(b[0]))
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=1e-4, atol=1e-6), name


# ----- the chunked loss itself ----------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "wrapped-module"])
def test_chunked_linear_cross_entropy_equals_full_logits(wrapped):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=True)
    head = torch.nn.Sequential(linear) if wrapped else linear  # a non-Linear module takes the checkpointed path
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    params = [hidden, linear.weight, linear.bias]

    ours = linear_cross_entropy_sum(hidden, head, targets, chunk_rows=5)  # 5 chunks, the last one short
    got = torch.autograd.grad(ours * 0.7, params)
    ref = F.cross_entropy(hidden @ linear.weight.T + linear.bias, targets, reduction="sum")
    want = torch.autograd.grad(ref * 0.7, params)
    assert torch.allclose(ours, ref, rtol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy_sum(hidden, head, targets, chunk_rows=4), ref, rtol=1e-6)


def test_frozen_head_gets_no_gradient_and_no_double_backward():
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, head, torch.randint(0, 20, (6,)), chunk_rows=4)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    assert head.weight.grad is None
    with pytest.raises(RuntimeError):  # once_differentiable: AdaHessian must take the full-logits path
        grad.sum().backward()


# ----- the causal-LM task through peft wrappers -------------------------------------------------------
ADAPTED = {
    "lora-qv": dict(target_modules=["q_proj", "v_proj"]),
    "lora-with-lm_head": dict(target_modules=["q_proj", "lm_head"]),  # a peft-wrapped output layer
    "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    "full": None,  # every parameter trains, the tied embedding/output matrix too
}


@pytest.mark.parametrize("kind", ADAPTED)
@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch], ids=["padded", "packed"])
def test_causal_lm_loss_and_gradients_equal_the_full_logits(kind, make_batch):
    model = tiny_llama()
    if ADAPTED[kind] is None:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian",
                                                 **ADAPTED[kind]))
    batch = make_batch()
    task = CausalLM(cfg(packing="position_ids" in batch), TOKENIZER)
    split = loss_and_grads(model, lambda: task.forward_loss(model, batch)[1])
    assert task.split and "loss positions" in task.notes[0]
    assert_same(split, loss_and_grads(model, lambda: reference_loss(model, batch)))
    full = CausalLM(cfg("full"), TOKENIZER)
    assert_same(split, loss_and_grads(model, lambda: full.forward_loss(model, batch)[1]))
    assert not full.split and full.notes == ["loss: full logits (train.logits=full)"]


def test_outputs_hold_exactly_the_loss_rows():
    model = tiny_llama().eval()
    batch = padded_batch()
    task = CausalLM(cfg(), TOKENIZER)
    with torch.no_grad():
        outputs, _ = task.forward_loss(model, batch)
        logits = forward(model, batch).logits
    assert isinstance(outputs, LossPositionOutputs)
    keep = batch["labels"][:, 1:] != -100
    assert outputs.hidden.shape[0] == int(keep.sum()) == 14 + 8 + 14  # labels 6..19, row 1 only 6..13
    assert torch.allclose(outputs.logits(), logits[:, :-1][keep], atol=1e-5)


def test_models_that_transform_their_logits_keep_the_full_path():
    torch.manual_seed(0)  # Gemma 2 softcaps the output layer's result: the split would skip that
    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                           vocab_size=VOCAB, final_logit_softcapping=1.0))
    batch = padded_batch()
    task = CausalLM(cfg(), TOKENIZER)
    got = loss_and_grads(model, lambda: task.forward_loss(model, batch)[1])
    assert not task.split and "softcapping" in task.notes[0]
    assert_same(got, loss_and_grads(model, lambda: reference_loss(model, batch)))
    adahessian = CausalLM(cfg(optimizer="adahessian"), TOKENIZER)
    adahessian.forward_loss(tiny_llama(), batch)
    assert not adahessian.split and "double backward" in adahessian.notes[0]


# ----- BA-LoRA's logit terms on the loss positions ----------------------------------------------------
def test_balora_terms_and_gradients_equal_the_full_logits():
    peft_model, hooks = ADAPTERS["balora"].build(tiny_llama(), balora.BaLoraOptions(r=4, alpha=4, entropy_top_k=7),
                                                 BuildContext("causal_lm", 20, 0))
    with torch.no_grad():  # move the adapter off its PiSSA init, so the consistency term is not 0
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    peft_model.train()
    batch = packed_batch()

    def total(task):
        outputs, loss = task.forward_loss(peft_model, batch)
        terms = hooks.extra_losses(batch, outputs, peft_model)
        total.terms[task.split] = {k: float(v.detach()) for k, v in terms.items()}
        return loss + sum(terms.values())

    total.terms = {}
    split = loss_and_grads(peft_model, lambda: total(CausalLM(cfg(), TOKENIZER)))
    full = loss_and_grads(peft_model, lambda: total(CausalLM(cfg("full"), TOKENIZER)))
    assert_same(split, full)
    assert total.terms[True].keys() == {"reg/consistency", "reg/diversity", "reg/svd"}
    for name, value in total.terms[False].items():
        assert value != 0.0 and total.terms[True][name] == pytest.approx(value, rel=1e-5), name


def test_balora_teacher_runs_the_original_model_on_the_same_rows():
    original = tiny_llama()
    peft_model, hooks = ADAPTERS["balora"].build(copy.deepcopy(original), balora.BaLoraOptions(r=4, alpha=4),
                                                 BuildContext("causal_lm", 20, 0))
    batch = padded_batch()
    outputs, _ = CausalLM(cfg(), TOKENIZER).forward_loss(peft_model, batch)
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        want = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    assert torch.allclose(hooks._teacher_rows(batch, outputs), want, atol=1e-5)


# ----- the loop: the same trajectory as the full-logits computation -----------------------------------
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_loop_keeps_the_full_logits_loss_trajectory(tmp_path, packing, capsys):
    """Chat SFT on tiny:llama with LoRA dropout on: every step's loss and the trained adapter equal
    those of the full-logits path (the split draws nothing from the RNG the dropout uses)."""
    from cli_runner import TINY, assert_same_training, run_inprocess

    runs = {}
    for logits in ("full", "auto"):
        out = tmp_path / logits
        assert run_inprocess("--config", TINY, f"train.output_dir={out}", "data.path=packaged:chitchat",
                             "data.format=chat", "data.max_examples=48", "data.max_length=96", "adapter.dropout=0.05",
                             f"data.packing={str(packing).lower()}", "model.attn_implementation=sdpa",
                             "train.max_steps=4", "train.eval_batches=1", f"train.logits={logits}") == 0
        runs[logits] = out
    assert "loss positions only" in capsys.readouterr().out
    assert_same_training(runs["full"], runs["auto"], steps=4)
