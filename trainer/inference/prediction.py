"""`train.py predict --run RUN --data FILE --out FILE.jsonl`: one JSON line per row (per query).

- causal LM: {row, prompt, answer}, the greedy answer (up to the run's train.max_new_tokens) to a
  chat row's conversation up to its last user message (through the chat template, as training
  rendered it), an alpaca row's instruction (the training prompt), a `prompt` (one user message)
  or a `text` (continued as it is), in that order of preference.
- classification: {row, text, label, probabilities}: the most probable label's name and the
  softmax probability of every label.
- retrieval and re-ranking: {row, query, ranked}: each distinct query of the file ranked against
  every distinct passage of the file; `ranked` holds the best --top-k as {row, passage, score},
  where row is the passage's first row in the file (its id).

`row` is the 1-based row of the input, as data errors count rows.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from tqdm.auto import tqdm

from trainer.data.formats import alpaca_prompt, chat_messages, classification_ids
from trainer.errors import UserError
from trainer.evaluate import generate_answer, prompt_ids
from trainer.inference import run as runs
from trainer.objective import forward

# task -> (do a file's columns fit it?, the columns a user is told to give)
COLUMNS = {
    "causal_lm": (lambda c: bool(c & {"messages", "instruction", "prompt", "text"}), "messages, instruction, prompt or text"),
    "sequence_classification": (lambda c: "text" in c, "text"),
    "retrieval": (lambda c: {"query", "passage"} <= c, "query and passage (the passages to rank)"),
    "reranking": (lambda c: {"query", "passage"} <= c, "query and passage (the passages to rank)"),
}
TOP_K = 10


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py predict", description="predict with a finished run, one JSON line per row")
    p.add_argument("--run", required=True, help="run directory (its train.output_dir)")
    p.add_argument("--data", required=True, help="a data file or packaged:NAME")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=runs.positive_int, help="rows per forward (default: the run's train.batch_size)")
    p.add_argument("--top-k", type=runs.positive_int, default=TOP_K, help=f"passages per query to list ({TOP_K})")
    p.add_argument("--max-new-tokens", type=runs.positive_int, help="answer length (default: the run's train.max_new_tokens)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    runs.check_out(args.out, args.overwrite)
    run = runs.open_run(args.run)
    task = run.cfg.model.task
    rows = runs.read_rows(args.data, task, COLUMNS)
    tokenizer = run.tokenizer()
    # every row is checked before the model loads
    if task == "causal_lm":
        inputs = [_prompt(row, tokenizer, f"{args.data}: row {i + 1}") for i, row in enumerate(rows)]
    elif task == "sequence_classification":
        inputs = [classification_ids(_string(row, "text", f"{args.data}: row {i + 1}", nonempty=False), tokenizer,
                                     run.cfg.data.max_length) for i, row in enumerate(rows)]
    else:
        inputs = _pool(rows, args.data)
    loaded = runs.load(run, tokenizer)
    batch_size = args.batch_size or run.cfg.train.batch_size
    if task == "causal_lm":
        predictions = answers(loaded, inputs, args.max_new_tokens or run.cfg.train.max_new_tokens)
    elif task == "sequence_classification":
        predictions = [{"row": i + 1, "text": row["text"], **p}
                       for i, (row, p) in enumerate(zip(rows, classify(loaded, inputs, batch_size)))]
    else:
        predictions = rank(loaded, *inputs, batch_size, args.top_k)
    runs.write_out(args.out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    print(f"{len(predictions)} predictions written to {args.out}")
    return 0


def answers(loaded, prompts: list[tuple[str, torch.Tensor]], max_new_tokens: int) -> list[dict]:
    out = []
    for i, (shown, ids) in enumerate(tqdm(prompts, desc="predict", unit="row", dynamic_ncols=True)):
        answer = generate_answer(loaded.accelerator, loaded.model, loaded.tokenizer, ids, max_new_tokens)
        out.append({"row": i + 1, "prompt": shown, "answer": answer})
    return out


@torch.no_grad()
def classify(loaded, inputs: list[list[int]], batch_size: int) -> list[dict]:
    """{label, probabilities} of each input (token ids)."""
    names, out = loaded.labels.names, []
    device = loaded.accelerator.device
    with runs.forward_progress(loaded.model, math.ceil(len(inputs) / batch_size), "predict"):
        for start in range(0, len(inputs), batch_size):
            # right-padded with an attention mask, as training's collator pads
            batch = loaded.tokenizer.pad({"input_ids": inputs[start:start + batch_size]}, return_tensors="pt")
            logits = forward(loaded.model, {k: v.to(device) for k, v in batch.items()}).logits.float()
            for p in logits.softmax(-1).cpu().tolist():
                best = max(range(len(p)), key=p.__getitem__)
                out.append({"label": names[best], "probabilities": dict(zip(names, p))})
    return out


@torch.no_grad()
def rank(loaded, queries: dict[str, int], passages: dict[str, int], batch_size: int, top_k: int) -> list[dict]:
    """Every query scored against every passage by the run's model (cosine of the bi-encoder's
    embeddings, or the cross-encoder's relevance logit); the best `top_k`, ties in file order."""
    task, device = loaded.task, loaded.accelerator.device
    q_texts, p_texts = list(queries), list(passages)
    if task.name == "retrieval":
        total = math.ceil(len(q_texts) / batch_size) + math.ceil(len(p_texts) / batch_size)
        with runs.forward_progress(loaded.model, total, "predict"):
            scores = task.encode(loaded.model, q_texts, batch_size, device) @ task.encode(loaded.model, p_texts, batch_size, device).T
    else:
        pairs = [(q, p) for q in q_texts for p in p_texts]
        chunk = batch_size * batch_size  # as many sequences as a training micro-batch
        flat = []
        with runs.forward_progress(loaded.model, math.ceil(len(pairs) / chunk), "predict"):
            for start in range(0, len(pairs), chunk):
                part = pairs[start:start + chunk]
                batch = task.pairs([q for q, _ in part], [p for _, p in part])
                flat.append(forward(loaded.model, {k: v.to(device) for k, v in batch.items()}).logits.reshape(-1))
        scores = torch.cat(flat).reshape(len(q_texts), len(p_texts))
    scores = scores.float().cpu()
    order = torch.argsort(-scores, dim=1, stable=True)[:, :top_k]
    return [{"row": queries[q], "query": q,
             "ranked": [{"row": passages[p_texts[j]], "passage": p_texts[j], "score": float(scores[i, j])}
                        for j in order[i].tolist()]}
            for i, q in enumerate(q_texts)]


def _prompt(row: dict, tokenizer, where: str) -> tuple[str, torch.Tensor]:
    """(the user's text, the prompt ids [1, length]) of one causal row, rendered as training did."""
    if row.get("messages") is not None:
        if not tokenizer.chat_template:
            raise UserError("chat rows need a chat template, and this run's tokenizer has none", where=where,
                            hint="give prompt or text rows")
        messages = chat_messages(row, where)
        while messages[-1]["role"] == "assistant" and len(messages) > 1:  # a reference answer: not the prompt
            messages.pop()
        if messages[-1]["role"] != "user":
            raise UserError("the conversation has no user message to answer", where=where)
        return messages[-1]["content"], prompt_ids(tokenizer, messages)
    if row.get("instruction") is not None:
        return row["instruction"], tokenizer(alpaca_prompt(row, where), return_tensors="pt")["input_ids"]
    if row.get("prompt") is not None:
        text = _string(row, "prompt", where, nonempty=False)
        return text, prompt_ids(tokenizer, text)
    text = _string(row, "text", where, nonempty=False)
    return text, tokenizer(text, return_tensors="pt")["input_ids"]


def _pool(rows: list[dict], path: str) -> tuple[dict[str, int], dict[str, int]]:
    """Distinct queries and passages of the file -> their first (1-based) row. A row may hold
    only a query or only a passage (null or missing on the other side)."""
    queries, passages = {}, {}
    for i, row in enumerate(rows):
        for field, seen in (("query", queries), ("passage", passages)):
            if row.get(field) is not None:
                seen.setdefault(_string(row, field, f"{path}: row {i + 1}"), i + 1)
    for field, seen in (("query", queries), ("passage", passages)):
        if not seen:
            raise UserError(f"no row has a {field}", where=f"--data {path}")
    return queries, passages


def _string(row: dict, field: str, where: str, nonempty: bool = True) -> str:
    value = row.get(field)
    if value is None:
        raise UserError(f"missing field '{field}'", where=where)
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise UserError(f"field '{field}' must be a {'non-empty ' if nonempty else ''}string, got {value!r}", where=where)
    return value
