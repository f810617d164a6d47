"""Held-out evaluation and before/after sample answers."""
from __future__ import annotations

import torch

from trainer.objective import forward, loss_sum, loss_units


@torch.no_grad()
def evaluate(accelerator, model, examples: list[dict], collate, batch_size: int, task: str,
             max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss (and accuracy for classification) over this process's shard,
    summed across processes."""
    model.eval()
    shard = examples[accelerator.process_index::accelerator.num_processes]
    starts = list(range(0, len(shard), batch_size))[:max_batches]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, units, correct
    # every process must run the same number of forwards (ZeRO-3 gathers weights collectively)
    n_batches = int(accelerator.gather(torch.tensor([len(starts)], device=accelerator.device)).max())
    for i in range(n_batches):
        chunk = shard[starts[i]:starts[i] + batch_size] if i < len(starts) else shard[:1]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk).items()}
        logits = forward(model, batch).logits
        if i < len(starts):
            totals[0] += loss_sum(logits, batch, task).double()
            totals[1] += loss_units(batch, task)
            if task == "sequence_classification":
                totals[2] += (logits.argmax(-1) == batch["label"]).sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    out = {"eval/loss": float(totals[0] / totals[1].clamp(min=1))}
    if task == "sequence_classification":
        out["eval/accuracy"] = float(totals[2] / totals[1].clamp(min=1))
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
