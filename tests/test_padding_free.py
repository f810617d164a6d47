"""Padding-free forward (trainer.padding_free): a padded causal-LM batch run as one row of its real
tokens gives the loss, gradients and BA-LoRA terms of the padded forward written out (every
position's logits, one cross-entropy), really runs on fewer positions, and leaves batches it
cannot unpad alone."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import adapters.balora as balora
import trainer.varlen_attention  # noqa: F401  (registers sdpa_varlen)
from adapters.base import ADAPTERS, BuildContext
from test_lm_loss import LLAMA, TOKENIZER, assert_same, cfg, loss_and_grads, packed_batch, padded_batch, reference_loss
from trainer.padding_free import unpad
from trainer.tasks.causal_lm import CausalLM


def llama(attention: str, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA)
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "v_proj", "down_proj"]))


def ragged_batch():
    """4 right-padded rows of 20, 14, 5 and 20 real tokens (one with no loss at all)."""
    batch = padded_batch()
    g = torch.Generator().manual_seed(7)
    ids = torch.cat([batch["input_ids"], torch.randint(1, 300, (1, 20), generator=g)])
    labels = torch.cat([batch["labels"], ids[3:].clone()])
    mask = torch.cat([batch["attention_mask"], torch.ones(1, 20, dtype=torch.long)])
    mask[2, 5:] = 0
    labels[2, :] = -100
    ids[mask == 0] = 0  # the pad token, as the collator writes it
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_unpad_lays_the_real_tokens_of_every_row_end_to_end():
    batch = ragged_batch()
    inputs, mask = unpad(batch)
    lengths = [20, 14, 5, 20]
    want_ids = torch.cat([batch["input_ids"][r, :n] for r, n in enumerate(lengths)])
    want_pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(inputs["input_ids"], want_ids[None]) and torch.equal(inputs["position_ids"], want_pos[None])
    assert int(mask.sum()) == sum(lengths)


def test_batches_that_cannot_be_unpadded_are_left_alone():
    full = {k: v[[0]] for k, v in padded_batch().items()}  # a row without padding
    assert unpad(full) is None
    left = padded_batch()
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding: positions would be wrong
    assert unpad(left) is None
    assert unpad(packed_batch()) is None  # already one row of documents per row


@pytest.mark.parametrize("adapted", [True, False], ids=["lora", "full"])
def test_loss_and_gradients_equal_the_padded_forward(adapted):
    varlen = llama("sdpa_varlen")
    padded = llama("sdpa")  # the same weights, transformers' own padded attention
    if adapted:
        varlen, padded = lora(varlen), lora(padded)
        padded.load_state_dict(varlen.state_dict())
    else:
        varlen.requires_grad_(True), padded.requires_grad_(True)
    batch = ragged_batch()
    task = CausalLM(cfg(), TOKENIZER)
    seen = []
    embed = varlen.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ours = loss_and_grads(varlen, lambda: task.forward_loss(varlen, batch)[1])
    embed.remove()
    assert task.padding_free and any("padding-free" in n for n in task.notes)
    assert seen[-1] == torch.Size([1, 59])  # 20 + 14 + 5 + 20 real tokens, not 4 x 20 positions (before it: the split check)
    assert_same(ours, loss_and_grads(padded, lambda: reference_loss(padded, batch)))


def test_off_and_models_without_document_attention_stay_padded():
    batch = ragged_batch()
    for model, setting in ((llama("sdpa_varlen"), False), (llama("sdpa"), True), (llama("eager"), True)):
        task = CausalLM(cfg(padding_free=setting), TOKENIZER)
        outputs, _ = task.forward_loss(model, batch)
        assert not task.padding_free and not outputs.padding_free
        assert not any("padding-free" in n for n in task.notes)


def test_balora_terms_and_teacher_equal_the_padded_full_logits():
    base = llama("sdpa_varlen")
    model, hooks = ADAPTERS["balora"].build(base, balora.BaLoraOptions(r=4, alpha=4, entropy_top_k=7),
                                            BuildContext("causal_lm", 20, 0))
    with torch.no_grad():  # off the PiSSA init, so the consistency term is not 0
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    model.train()
    batch = ragged_batch()
    terms = {}

    def total(task):
        outputs, loss = task.forward_loss(model, batch)
        extra = hooks.extra_losses(batch, outputs, model)
        terms[task.padding_free] = {k: float(v.detach()) for k, v in extra.items()}
        return loss + sum(extra.values())

    ours = loss_and_grads(model, lambda: total(CausalLM(cfg(), TOKENIZER)))
    # the full-logits path runs the padded batch through the padded mask (sdpa_varlen falls back to SDPA)
    want = loss_and_grads(model, lambda: total(CausalLM(cfg("full"), TOKENIZER)))
    assert set(terms) == {True, False}
    assert_same(ours, want)
    for name, value in terms[False].items():
        assert value != 0.0 and terms[True][name] == pytest.approx(value, rel=1e-5), name


def test_the_loop_keeps_the_padded_loss_trajectory(tmp_path, capsys):
    """Chat SFT on tiny:llama, attention left to the loop (sdpa_varlen on the CPU): every step's
    loss and the trained adapter equal the padded run's (dropout 0: its draws depend on the layout)."""
    from cli_runner import TINY, assert_same_training, run_inprocess

    runs = {}
    for setting in ("false", "true"):
        out = tmp_path / setting
        assert run_inprocess("--config", TINY, f"train.output_dir={out}", "data.path=packaged:chitchat",
                             "data.format=chat", "data.max_examples=48", "data.max_length=96", "adapter.dropout=0",
                             "train.max_steps=4", "train.eval_batches=1", f"train.padding_free={setting}") == 0
        runs[setting] = out
    log = capsys.readouterr().out
    assert "padding-free" in log and "attention: sdpa_varlen" in log
    assert_same_training(runs["false"], runs["true"], steps=4)
