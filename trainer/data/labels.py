"""Class labels as users have them: string names, a `datasets` ClassLabel, or integer ids.

A classification run names its classes once, before anything loads (`resolve`):
- `data.labels: [a, b, ...]` given: name i is class i;
- a `datasets` ClassLabel column (a save_to_disk folder, or a parquet file written by datasets):
  its names in its own order, so the ids stay the dataset's ids;
- string labels in `data.path`: their distinct values, sorted;
- integer ids (or digit strings, as CSV cells often are): named "0", "1", ... in id order, so
  id i stays class i.

`model.num_labels` follows the labels unless set (then it must agree). The names are written into
the run's config.yaml (and labels.json beside it and in the saved adapter, `id2label`/`label2id` in
a saved model's config), so evaluation and prediction map labels exactly as training did, and a
label the run was never trained on is an error naming its file and row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

from pydantic import BeforeValidator

from trainer.errors import UserError

TASK = "sequence_classification"
LABELS_FILE = "labels.json"


def _key(value) -> str | None:
    """A label as the text that names it: 1, 1.0 (a CSV column with gaps), "1" and "01" are all "1"."""
    if isinstance(value, bool):
        return None  # true/false would silently become "True"/"False"; refuse instead
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()  # " positive" after a CSV comma is "positive"
        return str(int(text)) if text.isdecimal() else text or None  # "01" is id 1
    return None


def _names_from_yaml(value):
    """`data.labels: [0, 1]` in YAML is a list of ints; names are text."""
    if isinstance(value, list):
        return [_key(v) if _key(v) is not None else v for v in value]
    return value


# The type of `data.labels` in the config schema.
LabelNames = Annotated[Optional[list[str]], BeforeValidator(_names_from_yaml)]


class LabelMap:
    """Class names in id order; a row's label maps to an id by its name (ids are names "0", "1", ...)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.label2id = {name: i for i, name in enumerate(self.names)}

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def id_of(self, value, where: str) -> int:
        """The class id of one row's label; `where` ("FILE: row N") names it in every error."""
        if value is None:
            raise UserError("missing field 'label'", where=where)
        key = _key(value)
        if key not in self.label2id:
            raise UserError(f"label {value!r} is not one of the run's labels ({', '.join(self.names)})", where=where,
                            hint="a model predicts only the labels it was trained on (data.labels)")
        return self.label2id[key]

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def to_json(self) -> dict:
        """The mapping in the shape a transformers config.json holds it."""
        return {"id2label": {str(i): name for i, name in enumerate(self.names)}, "label2id": dict(self.label2id)}


def infer(rows: list[dict], source: str, declared: list[str] | None = None,
          num_labels: int | None = None) -> LabelMap:
    """The classes of the training rows `rows` (read from `source`): `declared` names if given
    (data.labels, a ClassLabel), else the rows' integer ids or their sorted string names."""
    if declared is not None:
        return _checked(list(declared), num_labels, f"data.path={source}")
    keys = []
    for index, row in enumerate(rows):
        value = row.get("label")
        key = _key(value)
        if key is None:
            what = "missing field 'label'" if value is None else f"field 'label' must be a class name or id, got {value!r}"
            raise UserError(what, where=f"{source}: row {index + 1}")
        keys.append(key)
    if all(k.isdecimal() for k in keys):
        top = max(int(k) for k in keys)
        if num_labels is not None and top >= num_labels:
            row = next(i for i, k in enumerate(keys) if int(k) == top) + 1
            raise UserError(f"label {top} is outside model.num_labels={num_labels} classes", where=f"{source}: row {row}",
                            hint="raise model.num_labels or leave it unset: it follows the labels")
        return LabelMap([str(i) for i in range(num_labels if num_labels is not None else max(top + 1, 2))])
    return _checked(sorted(set(keys)), num_labels, f"data.path={source}")


def _checked(names: list[str], num_labels: int | None, where: str) -> LabelMap:
    if len(set(names)) != len(names):
        raise UserError(f"the labels repeat a name: {names}", where=where)
    if len(names) < 2:
        raise UserError(f"only one label ({', '.join(names)}); classification needs two or more", where=where)
    if num_labels is not None and num_labels != len(names):
        raise UserError(f"model.num_labels={num_labels}, but there are {len(names)} labels ({', '.join(names)})",
                        where=where, hint="leave model.num_labels unset: it follows the labels")
    return LabelMap(names)


def resolve(cfg):
    """`cfg` with `data.labels` and `model.num_labels` resolved, for classification; other tasks
    and already resolved configs come back as they are. Reads `data.path` unless `data.labels` is set."""
    if cfg.model.task != TASK:
        return cfg
    if cfg.data.labels is not None:
        labels = _checked(list(cfg.data.labels), cfg.model.num_labels, "data.labels")
    else:
        from trainer.data.sources import class_names, load_rows  # sources imports pandas/pyarrow
        labels = infer(load_rows(cfg.data.path, "data.path"), cfg.data.path, class_names(cfg.data.path),
                       cfg.model.num_labels)
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"num_labels": labels.num_labels}),
        "data": cfg.data.model_copy(update={"labels": labels.names}),
    })


def of(cfg) -> LabelMap | None:
    """The classes of a resolved config, without I/O; None for tasks without labels. A config saved
    before labels had names (num_labels only) gets the names of its ids."""
    if cfg.model.task != TASK:
        return None
    if cfg.data.labels is not None:
        return LabelMap(cfg.data.labels)
    return LabelMap([str(i) for i in range(cfg.model.num_labels)])


def save(labels: LabelMap, folder: Path) -> None:
    (Path(folder) / LABELS_FILE).write_text(json.dumps(labels.to_json(), indent=1) + "\n")
