"""Token-level fine-tuning: a sequence forwarded and backpropagated in chunks gives the loss and
the LoRA gradients of one forward/backward of the whole sequence (fp32)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import model_cfg
from trainer.data.formats import IGNORE
from trainer.models import load_model
from trainer.objective import token_loss_sum
from trainer.serving.chunked import ChunkedSequence
from trainer.tasks.causal_lm import CausalLM


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def _lora_model(tokenizer, attn, targets=ALL):
    base = load_model(model_cfg("tiny:llama", attn_implementation=attn), tokenizer)
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=targets))
    return model.eval()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunks,targets", [([37], ALL), ([1, 36], ALL), ([8, 8, 8, 8, 5], ALL), ([20, 1, 16], ALL),
                                            ([3] * 12 + [1], ALL),
                                            # layer 0's keys carry no gradient without LoRA on k_proj
                                            ([8, 8, 8, 8, 5], ["q_proj", "v_proj"])])
@pytest.mark.parametrize("head_rows", [None, 5])  # full logits; lm_head at the loss positions, 5 rows at a time
def test_chunked_loss_and_grads_equal_full_sequence(smollm2_tokenizer, attn, chunks, targets, head_rows):
    model = _lora_model(smollm2_tokenizer, attn, targets)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(smollm2_tokenizer), (sum(chunks),), generator=g)
    labels = ids.clone()
    labels[:9] = IGNORE  # a prompt without loss, as in chat data
    scale = 1 / 29.0

    # reference: the whole sequence at once, the trainer's own loss
    full = token_loss_sum(model(input_ids=ids[None]).logits, labels[None]) * scale
    full.backward()
    full = full.detach()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    seq = ChunkedSequence(model, ids, labels, scale, head_rows=head_rows)
    with torch.no_grad():  # as on the engine thread: the chunks turn autograd on themselves
        for n in chunks:
            assert seq.next_backward is None
            seq.forward(n)
        assert seq.to_forward == 0
        while not seq.done:
            seq.backward()
    got = _grads(model)
    assert seq.loss_sum * scale == pytest.approx(full.item(), rel=1e-5)
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # and no gradient leaked anywhere else (the base stays frozen)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _task_loss(model, tokenizer, ids, labels, lengths):
    """The training loop's own loss of these right-padded rows (CausalLM.forward_loss: lm_head at the
    loss positions only, padding-free where the model's attention keeps documents apart)."""
    task_cfg = SimpleNamespace(data=SimpleNamespace(packing=False), optim=SimpleNamespace(name="adamw"),
                               train=SimpleNamespace(logits="auto", padding_free=True))
    task = CausalLM(task_cfg, tokenizer)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return task, batch, lambda: task.forward_loss(model, batch)[1]


@pytest.mark.parametrize("chunks,attn,whole", [([30], "sdpa", False), ([8, 8, 8, 6], "sdpa", False),
                                               ([1, 13, 16], "sdpa", False),
                                               # one unit covering the rows whole: the loop's own loss
                                               ([30], "sdpa", True), ([30], "sdpa_varlen", True),
                                               # given the loop's loss but cut in chunks: the chunk path
                                               ([8, 8, 8, 6], "sdpa_varlen", True)])
def test_rows_of_a_micro_batch_chunked_together_equal_each_row_alone(smollm2_tokenizer, chunks, attn, whole):
    """Rows of different lengths, right-padded and chunked together (the same positions of every row
    in one call), give the summed loss and the LoRA gradients of each row's own full forward/backward
    without its padding."""
    model = _lora_model(smollm2_tokenizer, attn)
    g = torch.Generator().manual_seed(1)
    lengths, width = [30, 17, 1 + 8, 24], sum(chunks)
    ids = torch.randint(0, len(smollm2_tokenizer), (len(lengths), width), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # prompts without loss
    for r, n in enumerate(lengths):  # padding: a token no real position may see, and no loss
        ids[r, n:], labels[r, n:] = smollm2_tokenizer.pad_token_id or 0, IGNORE
    scale = 1 / 50.0

    full = sum(token_loss_sum(model(input_ids=ids[r, None, :n]).logits, labels[r, None, :n]) * scale
               for r, n in enumerate(lengths))
    full.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    task, batch, loss_fn = _task_loss(model, smollm2_tokenizer, ids, labels, lengths) if whole else (None, None, None)
    seq = ChunkedSequence(model, ids, labels, scale, lengths, whole=loss_fn,
                          head_rows=task.loss_chunk_rows(model, batch) if whole else None)
    with torch.no_grad():  # as on the engine thread
        done = sum(seq.forward(n) for n in chunks)
        assert done == sum(lengths)  # padding is not counted as trained tokens
        while not seq.done:
            seq.backward()
    assert seq.loss_sum * scale == pytest.approx(full.item(), rel=1e-5)
    if whole and len(chunks) == 1:  # the task's path ran, padding-free exactly when the attention allows
        assert task.split and task.padding_free == (attn == "sdpa_varlen")
    got = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
