"""Held-out evaluation and before/after sample answers."""
from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(accelerator, model, examples: list[dict], task, batch_size: int,
             max_batches: int | None = None) -> dict[str, float]:
    """The task's held-out metrics: batch by batch (loss, accuracy), or over the whole held-out
    set (ranking tasks, whose loss and metrics rank against a candidate pool)."""
    model.eval()
    out = _batch_metrics(accelerator, model, examples, task, batch_size, max_batches) if task.batch_eval else {}
    out.update(task.eval_metrics(accelerator, model, examples, batch_size, max_batches))
    model.train()
    return out


def _batch_metrics(accelerator, model, examples, task, batch_size, max_batches) -> dict[str, float]:
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
    totals = accelerator.reduce(totals, reduction="sum")
    units = totals[1].clamp(min=1)
    out = {"eval/loss": float(totals[0] / units)}
    out.update({name: float(value / units) for name, value in zip(task.count_names, totals[2:])})
    return out


@torch.no_grad()
def sample_answers(accelerator, model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts (run on every process: ZeRO-3 generation is collective)."""
    model.eval()
    answers = []
    for prompt in prompts:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(accelerator.device)
        out = accelerator.unwrap_model(model).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, synced_gpus=accelerator.num_processes > 1)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train()
    return answers
