"""`train.py eval --run RUN [--data FILE_OR_packaged:NAME] [--out FILE]`: a run's metrics.

Without --data it evaluates the run's own held-out split (the same rows training evaluated on);
with --data, every row of that file, rendered as training renders rows and with the run's labels.
Metrics come from trainer.evaluate, the code training logs eval/* with: loss and perplexity for
a causal LM; loss, accuracy, macro-F1 and a confusion matrix for classification; loss, MRR@10 and
Recall@k for retrieval and re-ranking (each query against every distinct passage of the data,
or its BM25 candidates for re-ranking).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from trainer.data import build_examples, natural_format, pack
from trainer.data.formats import check_format
from trainer.errors import UserError
from trainer.evaluate import evaluate
from trainer.inference import run as runs
from trainer.inference.metrics import classification_metrics, table
from trainer.job import load_data

# task -> (do a file's columns fit it?, the columns a user is told to give): the training formats
COLUMNS = {
    "causal_lm": (lambda c: "text" in c or {"instruction", "output"} <= c or "messages" in c,
                  "text, instruction and output (alpaca), or messages (chat)"),
    "sequence_classification": (lambda c: {"text", "label"} <= c, "text and label"),
    "retrieval": (lambda c: {"query", "passage"} <= c, "query and passage"),
    "reranking": (lambda c: {"query", "passage"} <= c, "query and passage"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py eval", description="evaluate a finished run")
    p.add_argument("--run", required=True, help="run directory (its train.output_dir)")
    p.add_argument("--data", help="a data file or packaged:NAME (default: the run's held-out split)")
    p.add_argument("--out", help="write the report as JSON here (default: print it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=runs.positive_int, help="rows per forward (default: the run's train.batch_size)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    runs.check_out(args.out, args.overwrite)
    run = runs.open_run(args.run)
    # the data first: a file that does not fit (columns, labels) is refused before the model loads
    tokenizer = run.tokenizer()
    if args.data is None:
        examples, source = _held_out(run, tokenizer), f"the held-out split of {run.cfg.data.path}"
    else:
        rows = runs.read_rows(args.data, run.cfg.model.task, COLUMNS)
        examples, source = _examples(run, tokenizer, rows, args.data), args.data
    loaded = runs.load(run, tokenizer)
    report = evaluate_run(loaded, examples, source, args.batch_size or run.cfg.train.batch_size)
    text = json.dumps(report, indent=1)
    print(table(report))
    if args.out:
        runs.write_out(args.out, text + "\n")
        print(f"report written to {args.out}")
    else:
        print(text)
    return 0


def evaluate_run(loaded, examples: list[dict], source: str, batch_size: int) -> dict:
    """The report of `loaded` on `examples`: {run, task, data, examples, metrics[, confusion_matrix]}."""
    task, classes = loaded.task, loaded.labels
    confusion = torch.zeros(classes.num_labels, classes.num_labels, dtype=torch.long) if classes else None

    def count(outputs, batch):  # rows: true label, columns: predicted label
        n = classes.num_labels
        pairs = batch["label"].cpu() * n + outputs.logits.argmax(-1).cpu()
        confusion.view(-1).add_(torch.bincount(pairs, minlength=n * n))

    total = math.ceil(len(examples) / batch_size) if task.batch_eval else None
    with runs.forward_progress(loaded.model, total, "eval"):
        values = evaluate(loaded.accelerator, loaded.model, examples, task, batch_size,
                          on_batch=count if classes else None)
    metrics = {name.removeprefix("eval/"): value for name, value in values.items()}
    if task.name == "causal_lm":
        metrics["perplexity"] = math.exp(metrics["loss"])
    report = {"run": str(loaded.run.run_dir), "task": task.name, "data": source, "examples": len(examples),
              "metrics": metrics}
    if classes is not None:
        matrix = confusion.tolist()
        metrics.update(classification_metrics(matrix))
        report["confusion_matrix"] = {"labels": classes.names, "matrix": matrix}
    return report


def _held_out(run, tokenizer) -> list[dict]:
    """The rows the run held out. The split is drawn before data.max_examples caps the training
    rows, so rendering one training example gives the same split without rendering them all."""
    cfg = run.cfg.model_copy(update={"data": run.cfg.data.model_copy(update={"max_examples": 1})})
    _, held_out = load_data(cfg, tokenizer)
    if not held_out:
        raise UserError("the run held out no data to evaluate on (data.eval_fraction=0, no data.eval_path)",
                        where=f"--run {run.run_dir}", hint="pass --data FILE")
    return held_out


def _examples(run, tokenizer, rows: list[dict], path: str) -> list[dict]:
    """Every row of `path` rendered as the run renders its data (format, length, labels, packing)."""
    cfg = run.cfg
    fmt = natural_format(path, rows)
    try:
        check_format(fmt, cfg.model.task, tokenizer)
    except UserError as e:  # e.g. a chat file for a model without a chat template
        raise UserError(e.what, where=f"--data {path}", hint=e.hint) from None
    examples = build_examples(list(enumerate(rows)), fmt, tokenizer, cfg.model.task, cfg.data.max_length,
                              path, labels=run.labels)
    return pack(examples, cfg.data.max_length) if cfg.data.packing else examples
