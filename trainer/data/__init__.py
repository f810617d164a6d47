"""Data: read rows (sources, packaged), render them to tokens (formats), pack and collate (packing).

`build_datasets` is the one call the loop needs: it returns plain lists of examples (dicts of
token lists; for `pairs`, of the two texts); the loop samples them and its task collates them.
"""
from __future__ import annotations

import logging
import random

from trainer.data import packaged
from trainer.data.formats import IGNORE, check_format, infer_format, render
from trainer.data.labels import LabelMap
from trainer.data.labels import infer as infer_labels
from trainer.data.packing import Collator, count_loss_tokens, pack
from trainer.data.sources import class_names, load_rows
from trainer.errors import UserError

__all__ = ["Collator", "LabelMap", "build_datasets", "build_examples", "count_loss_tokens", "load_rows",
           "natural_format", "pack"]

log = logging.getLogger(__name__)


def build_datasets(data_cfg, tokenizer, task: str, seed: int,
                   labels: LabelMap | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples from `data.path`, with eval held out by `data.eval_path` or a seeded
    `data.eval_fraction` of the rows (chosen before any cap, so it does not depend on it).

    Examples with nothing to learn are dropped; `data.max_examples` caps the training documents
    (before packing); with `data.packing` both sets are packed into rows of `data.max_length`.
    Classification labels map to ids by `labels` (a resolved run's, see trainer.data.labels),
    else by the classes of these rows.
    """
    rows = load_rows(data_cfg.path, "data.path")
    fmt = data_cfg.format or natural_format(data_cfg.path, rows)
    check_format(fmt, task, tokenizer)
    if data_cfg.packing and task != "causal_lm":
        raise UserError("packing applies to causal LM data only", where="data.packing",
                        hint="set data.packing=false for sequence_classification")
    if fmt == "classification" and labels is None:
        labels = infer_labels(rows, data_cfg.path, data_cfg.labels if data_cfg.labels is not None
                              else class_names(data_cfg.path))

    train_rows = list(enumerate(rows))
    if data_cfg.eval_path:
        eval_source = data_cfg.eval_path
        eval_rows = list(enumerate(load_rows(data_cfg.eval_path, "data.eval_path")))
    else:
        eval_source = data_cfg.path
        train_rows, eval_rows = _split(train_rows, data_cfg.eval_fraction, seed)

    def build(source: str, indexed_rows: list, limit: int | None) -> list[dict]:
        return build_examples(indexed_rows, fmt, tokenizer, task, data_cfg.max_length, source, limit, labels)

    train = build(data_cfg.path, train_rows, data_cfg.max_examples)
    evaluation = build(eval_source, eval_rows, None)
    if data_cfg.packing:
        train, evaluation = pack(train, data_cfg.max_length), pack(evaluation, data_cfg.max_length)
    return train, evaluation


def build_examples(indexed_rows: list[tuple[int, dict]], fmt: str, tokenizer, task: str, max_length: int,
                   source: str, limit: int | None = None, labels: LabelMap | None = None) -> list[dict]:
    """Render (row index, row) pairs of `source` to examples, at most `limit`; causal examples with
    no token to learn from are dropped (with a warning), and none left at all is an error."""
    examples, dropped = [], 0
    for index, row in indexed_rows:
        if limit is not None and len(examples) >= limit:
            break
        example = render(row, fmt, tokenizer, max_length, where=f"{source}: row {index + 1}", labels=labels)
        if "source" in row:  # where the row came from (a topic, a site): federated partitions split by it
            example["source"] = row["source"]
        if task == "causal_lm" and not _has_loss_tokens(example["labels"]):
            dropped += 1  # e.g. the prompt alone fills max_length
            continue
        examples.append(example)
    if dropped:
        log.warning("%s: dropped %d examples with no tokens to learn from at max_length %d",
                    source, dropped, max_length)
    if indexed_rows and not examples:
        raise UserError(f"no example has a token to learn from (max_length {max_length})",
                        where=source, hint="raise data.max_length")
    return examples


def natural_format(path: str, rows: list[dict]) -> str:
    """The format of `path` when data.format is unset: a corpus's own, else what its columns imply."""
    if path.startswith("packaged:"):
        return packaged.natural_format(path.removeprefix("packaged:"))
    return infer_format(rows)


def _split(indexed_rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` of the rows, at least one when fraction > 0."""
    if fraction <= 0:
        return indexed_rows, []
    count = max(1, round(fraction * len(indexed_rows)))
    if count >= len(indexed_rows):
        raise UserError(f"{len(indexed_rows)} rows are too few to hold out {count} for evaluation",
                        where="data.eval_fraction",
                        hint="add rows, lower the fraction, or give data.eval_path")
    held_out = set(random.Random(seed).sample(range(len(indexed_rows)), count))
    train = [item for i, item in enumerate(indexed_rows) if i not in held_out]
    evaluation = [item for i, item in enumerate(indexed_rows) if i in held_out]
    return train, evaluation


def _has_loss_tokens(labels: list[int]) -> bool:
    return any(label != IGNORE for label in labels[1:])  # position 0 is never predicted
