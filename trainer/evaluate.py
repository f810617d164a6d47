"""Held-out evaluation and generated answers (the before/after samples of a run, and
`train.py predict` on a causal LM)."""
from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(accelerator, model, examples: list[dict], task, batch_size: int,
             max_batches: int | None = None, on_batch=None) -> dict[str, float]:
    """The task's held-out metrics: batch by batch (loss, accuracy), or over the whole held-out
    set (ranking tasks, whose loss and metrics rank against a candidate pool). `on_batch(outputs,
    batch)` sees each batch-wise forward (`train.py eval` counts a confusion matrix with it)."""
    model.eval()
    out = _batch_metrics(accelerator, model, examples, task, batch_size, max_batches, on_batch) if task.batch_eval else {}
    out.update(task.eval_metrics(accelerator, model, examples, batch_size, max_batches))
    model.train()
    return out


def _batch_metrics(accelerator, model, examples, task, batch_size, max_batches, on_batch=None) -> dict[str, float]:
    """Unit-weighted mean task loss (plus the task's counted metrics, e.g. accuracy) over this
    process's shard, summed across processes."""
    shard = examples[accelerator.process_index::accelerator.num_processes]
    starts = list(range(0, len(shard), batch_size))[:max_batches]
    totals = torch.zeros(2 + len(task.count_names), dtype=torch.float64, device=accelerator.device)  # loss, units, counts
    # every process must run the same number of forwards (ZeRO-3 gathers weights collectively)
    n_batches = int(accelerator.gather(torch.tensor([len(starts)], device=accelerator.device)).max())
    for i in range(n_batches):
        chunk = shard[starts[i]:starts[i] + batch_size] if i < len(starts) else shard[:1]
        batch = {k: v.to(accelerator.device) for k, v in task.collate(chunk).items()}
        outputs, loss = task.forward_loss(model, batch)
        if i < len(starts):
            totals[0] += loss.double()
            totals[1] += task.units(batch)
            totals[2:] += task.eval_counts(outputs, batch).to(totals)
            if on_batch is not None:
                on_batch(outputs, batch)
    totals = accelerator.reduce(totals, reduction="sum")
    units = totals[1].clamp(min=1)
    out = {"eval/loss": float(totals[0] / units)}
    out.update({name: float(value / units) for name, value in zip(task.count_names, totals[2:])})
    return out


@torch.no_grad()
def sample_answers(accelerator, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts (run on every process: ZeRO-3 generation is collective)."""
    model.eval()
    answers = [generate_answer(accelerator, model, tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens)
               for prompt in prompts]
    model.train()
    return answers


def prompt_ids(tokenizer, prompt: str | list[dict]) -> torch.Tensor:
    """[1, length] ids asking for an answer: a user message (or a conversation) through the chat
    template with its assistant header; raw text for a tokenizer without a template."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate_answer(accelerator, model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    """The greedy continuation of the prompt `ids` [1, length], decoded without special tokens."""
    ids = ids.to(accelerator.device)
    out = accelerator.unwrap_model(model).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=accelerator.num_processes > 1)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
