"""`train.py eval` and `train.py predict` on finished tiny runs, against independent references: the
saved adapter loaded with peft onto a fresh base, the metrics computed here from its outputs by
brute force, `model.generate` on prompts built here with the tokenizer's own chat template.
And bad input: one line, exit 2, nothing written."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel

from cli_runner import ROOT, TINY, metrics, run_inprocess
from test_retrieval import brute_force_metrics
from trainer.config import load_config
from trainer.models import load_model, load_tokenizer
from trainer.tasks.ranking import held_out_pool
from trainer.tasks.retrieval import mean_pool

GOOD, BAD, MEH = "great great fun", "awful awful bore", "meh so so"
CLASSES = {"positive": GOOD, "negative": BAD, "neutral": MEH}


def _write_csv(path, items):
    path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in items))
    return path


def _reference(run_dir):
    """The run's config, tokenizer, and its saved adapter (or model) loaded with peft/transformers."""
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    if (run_dir / "model").is_dir():
        model = type(load_model(cfg.model, tokenizer)).from_pretrained(run_dir / "model")
    else:
        model = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), str(run_dir / "adapter"))
    return cfg, tokenizer, model.eval()


def _eval(run_dir, tmp_path, *extra) -> dict:
    out = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    assert run_inprocess("eval", "--run", str(run_dir), "--out", str(out), *extra) == 0
    return json.loads(out.read_text())


def _predict(run_dir, tmp_path, data, *extra) -> list[dict]:
    out = tmp_path / f"pred-{len(list(tmp_path.glob('pred-*')))}.jsonl"
    assert run_inprocess("predict", "--run", str(run_dir), "--data", str(data), "--out", str(out), *extra) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


# ---- classification with string labels: train -> eval -> predict ------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    words = {"positive": ["great", "fun", "loved"], "negative": ["awful", "bore", "hated"], "neutral": ["meh", "so", "okay"]}
    items = [(" ".join([words[c][i % 3], words[c][(i + 1) % 3], words[c][i % 3]]), c) for i in range(6) for c in words]
    train = _write_csv(root / "train.csv", items)
    held_out = _write_csv(root / "eval.csv", [(GOOD, "positive"), (BAD, "negative"), (MEH, "neutral"),
                                              ("great bore", "positive"), ("okay fun", "neutral"), ("hated so", "negative")])
    run_dir = root / "run"
    assert run_inprocess("model.name_or_path=tiny:bert", "model.task=sequence_classification", f"data.path={train}",
                         f"data.eval_path={held_out}", "data.max_length=16", "train.batch_size=6", "train.max_steps=25",
                         "optim.lr=5e-2", "adapter.r=4", "adapter.dropout=0.0", "train.lr_schedule=constant",
                         f"train.output_dir={run_dir}") == 0
    return {"run": run_dir, "eval": held_out}


def test_string_labels_are_saved_with_the_run(classifier):
    run_dir = classifier["run"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["labels"] == ["negative", "neutral", "positive"] and saved["model"]["num_labels"] == 3
    expected = {"0": "negative", "1": "neutral", "2": "positive"}
    for folder in (run_dir, run_dir / "adapter"):
        assert json.loads((folder / "labels.json").read_text())["id2label"] == expected


def test_eval_metrics_equal_a_direct_computation(classifier, tmp_path):
    report = _eval(classifier["run"], tmp_path, "--data", str(classifier["eval"]), "--batch-size", "4")
    cfg, tokenizer, model = _reference(classifier["run"])
    names = cfg.data.labels
    texts, gold = zip(*[(r["text"], names.index(r["label"])) for r in _csv_rows(classifier["eval"])])
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])
    predicted = logits.argmax(-1).tolist()
    n = len(names)
    confusion = [[sum(1 for g, p in zip(gold, predicted) if g == i and p == j) for j in range(n)] for i in range(n)]
    f1 = []
    for c in range(n):
        tp = sum(1 for g, p in zip(gold, predicted) if g == p == c)
        fp = sum(1 for g, p in zip(gold, predicted) if p == c and g != c)
        fn = sum(1 for g, p in zip(gold, predicted) if g == c and p != c)
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    assert report["examples"] == len(texts)
    assert report["confusion_matrix"] == {"labels": names, "matrix": confusion}
    got = report["metrics"]
    assert got["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, predicted)) / len(gold))
    assert got["macro_f1"] == pytest.approx(sum(f1) / len(f1))
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(gold))), rel=1e-4)
    assert got["accuracy"] > 0.5  # trained: chance is 1/3, so the matrix is not one column
    # the held-out split by default: the very rows (and result) of the run's own final evaluation
    final = [m for m in metrics(classifier["run"]) if "eval/loss" in m][-1]
    default = _eval(classifier["run"], tmp_path)["metrics"]
    assert default["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert default["accuracy"] == pytest.approx(final["eval/accuracy"])


def test_predict_labels_are_the_argmax_of_the_saved_model(classifier, tmp_path):
    data = tmp_path / "new.jsonl"
    texts = [GOOD, BAD, MEH, "fun fun", "a longer sentence that pads the others"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    predictions = _predict(classifier["run"], tmp_path, data, "--batch-size", "2")
    cfg, tokenizer, model = _reference(classifier["run"])
    with torch.no_grad():
        probs = [model(**tokenizer(t, return_tensors="pt")).logits[0].softmax(-1) for t in texts]
    assert [p["row"] for p in predictions] == [1, 2, 3, 4, 5] and [p["text"] for p in predictions] == texts
    assert [p["label"] for p in predictions] == [cfg.data.labels[int(q.argmax())] for q in probs]
    for p, q in zip(predictions, probs):
        assert list(p["probabilities"]) == cfg.data.labels
        assert list(p["probabilities"].values()) == pytest.approx(q.tolist(), abs=1e-5)
    assert predictions[0]["label"] == "positive" and predictions[1]["label"] == "negative"


def _csv_rows(path):
    import pandas as pd
    return pd.read_csv(path).to_dict("records")


# ---- causal LM: perplexity and generated answers ------------------------------------------------

@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    run_dir = root / "run"
    assert run_inprocess("--config", TINY, "data.path=packaged:chatterbot_qa", "data.format=chat", "data.max_examples=16",
                         "data.eval_fraction=0.01", "data.max_length=48", "train.max_steps=3", "train.max_new_tokens=6",
                         "train.eval_batches=null", "train.eval_at_start=true",
                         f"train.output_dir={run_dir}") == 0
    return run_dir


def _token_loss(model, examples) -> float:
    """Mean next-token cross-entropy over the loss tokens, one example at a time (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            logits = model(input_ids=ids).logits[0]
            keep = labels[1:] != -100
            total += float(F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_eval_perplexity_is_the_exp_of_the_direct_token_loss(chat_run, tmp_path):
    report = _eval(chat_run, tmp_path)
    cfg, tokenizer, model = _reference(chat_run)
    from trainer.job import load_data
    _, held_out = load_data(cfg, tokenizer)
    loss = _token_loss(model, held_out)
    assert report["examples"] == len(held_out)
    assert report["metrics"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    evals = {m["step"]: m["eval/loss"] for m in metrics(chat_run) if "eval/loss" in m}
    assert report["metrics"]["loss"] == pytest.approx(evals[cfg.train.max_steps], rel=1e-5)
    # train.eval_at_start: step 0 is the base model (LoRA starts as the identity) on the same rows
    assert evals[0] == pytest.approx(_token_loss(load_model(cfg.model, tokenizer).eval(), held_out), rel=1e-5)
    assert evals[0] != pytest.approx(evals[cfg.train.max_steps], rel=1e-3)


def test_predict_answers_equal_model_generate(chat_run, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "ref"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]},
        {"prompt": "Tell me a joke"},
        {"instruction": "Name a colour", "output": "red"},
        {"text": "To be, or not to be"},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    predictions = _predict(chat_run, tmp_path, data)
    cfg, tokenizer, model = _reference(chat_run)

    def chat(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    prompts = [chat(rows[0]["messages"][:1]), chat(rows[1]["messages"]),
               chat([{"role": "user", "content": "Tell me a joke"}]),
               tokenizer("### Instruction:\nName a colour\n\n### Response:\n", return_tensors="pt")["input_ids"],
               tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.train.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert [p["answer"] for p in predictions] == expected
    assert [p["prompt"] for p in predictions] == ["What is your name?", "Hello there", "Tell me a joke", "Name a colour",
                                                  "To be, or not to be"]
    assert any(expected)  # something was generated


# ---- retrieval (full fine-tuning: model/) and re-ranking (LoRA) ----------------------------------

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    words = "zero one two three four five six seven eight nine".split()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    combos = [(a, (a * 3 + 1) % 10, (a * 7 + 2) % 10) for a in range(10)] + [((a + 5) % 10, a, (a + 2) % 10) for a in range(10)]
    path.write_text("".join(json.dumps({"query": " ".join(map(str, c)), "passage": " ".join(words[d] for d in c)}) + "\n"
                            for c in combos))
    return path


@pytest.fixture(scope="module", params=[("retrieval", "none"), ("reranking", "lora")], ids=["retrieval", "reranking"])
def ranker(request, tmp_path_factory, pairs_file):
    task, adapter = request.param
    run_dir = tmp_path_factory.mktemp(task) / "run"
    assert run_inprocess("model.name_or_path=tiny:bert", f"model.task={task}", f"adapter.type={adapter}",
                         f"data.path={pairs_file}", "data.max_length=16", "data.eval_fraction=0.5", "train.batch_size=4",
                         "train.max_steps=2", "optim.lr=1e-3", f"train.output_dir={run_dir}") == 0
    return task, run_dir


def _scores(task, tokenizer, model, queries, passages):
    """[queries, passages] scores straight from the model, one text or pair at a time."""
    with torch.no_grad():
        if task == "retrieval":
            def embed(text):
                enc = tokenizer(text, return_tensors="pt")
                return F.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)[0]
            q, p = torch.stack([embed(t) for t in queries]), torch.stack([embed(t) for t in passages])
            return q @ p.T
        return torch.tensor([[float(model(**tokenizer(q, p, return_tensors="pt")).logits[0, 0]) for p in passages]
                             for q in queries])


def test_ranking_eval_and_predict_equal_brute_force(ranker, pairs_file, tmp_path):
    task, run_dir = ranker
    cfg, tokenizer, model = _reference(run_dir)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    queries = list(dict.fromkeys(r["query"] for r in rows))
    passages = list(dict.fromkeys(r["passage"] for r in rows))
    first_row = {}
    for i, r in enumerate(rows):
        first_row.setdefault(r["passage"], i + 1)
    scores = _scores(task, tokenizer, model, queries, passages)

    predictions = _predict(run_dir, tmp_path, pairs_file, "--top-k", "3")
    assert [p["query"] for p in predictions] == queries
    for i, p in enumerate(predictions):
        best = sorted(range(len(passages)), key=lambda j: (-float(scores[i, j]), j))[:3]
        assert [r["passage"] for r in p["ranked"]] == [passages[j] for j in best]
        assert [r["row"] for r in p["ranked"]] == [first_row[passages[j]] for j in best]
        assert [r["score"] for r in p["ranked"]] == pytest.approx([float(scores[i, j]) for j in best], abs=1e-4)

    if task == "retrieval":  # against every passage of the file, as the held-out pool is built
        report = _eval(run_dir, tmp_path, "--data", str(pairs_file))
        pool = held_out_pool([{"query": r["query"], "passage": r["passage"]} for r in rows])
        masked = scores.masked_fill(pool.excluded, float("-inf"))
        want = brute_force_metrics(masked.tolist(), pool.relevant.tolist())
        for name, value in want.items():
            assert report["metrics"][name.removeprefix("eval/")] == pytest.approx(value, abs=1e-6)
    else:  # its own held-out split: the run's final evaluation
        final = [m for m in metrics(run_dir) if "eval/mrr@10" in m][-1]
        report = _eval(run_dir, tmp_path)
        assert report["metrics"]["mrr@10"] == pytest.approx(final["eval/mrr@10"], abs=1e-6)
        assert report["metrics"]["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert run_inprocess("--config", TINY, "train.max_steps=4", "train.stop_after_steps=1", "train.eval_batches=1",
                         "data.max_length=32", f"train.output_dir={run_dir}") == 0
    return run_dir


def _bad(tmp_path, capsys, *args) -> str:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert run_inprocess(*args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line
           and "warnings.warn" not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    return err[0]


def test_unknown_run_dir_and_a_folder_that_is_no_run(tmp_path, capsys):
    out = str(tmp_path / "m.json")
    assert "--run nowhere: no such run directory" in _bad(tmp_path, capsys, "eval", "--run", "nowhere", "--out", out)
    (tmp_path / "empty").mkdir()
    line = _bad(tmp_path, capsys, "predict", "--run", str(tmp_path / "empty"), "--data", "x.jsonl", "--out", out)
    assert "no config.yaml" in line


def test_run_stopped_before_its_adapter_is_refused(stopped_run, tmp_path, capsys):
    line = _bad(tmp_path, capsys, "eval", "--run", str(stopped_run), "--out", str(tmp_path / "m.json"))
    assert "has no trained adapter/" in line and "step-1" in line and "train.resume=auto" in line


def test_data_that_does_not_fit_the_task_and_unseen_labels(classifier, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = str(tmp_path / "p.jsonl")
    line = _bad(tmp_path, capsys, "predict", "--run", str(classifier["run"]), "--data", str(chat), "--out", out)
    assert f"--data {chat}: its columns (messages) do not fit this run's task sequence_classification" in line
    unseen = _write_csv(tmp_path / "unseen.csv", [(GOOD, "positive"), (BAD, "furious")])
    line = _bad(tmp_path, capsys, "eval", "--run", str(classifier["run"]), "--data", str(unseen), "--out", out)
    assert f"{unseen}: row 2: label 'furious' is not one of the run's labels" in line


def test_an_existing_out_is_never_overwritten_without_overwrite(classifier, tmp_path, capsys):
    out = tmp_path / "report.json"
    out.write_text("mine")
    line = _bad(tmp_path, capsys, "eval", "--run", str(classifier["run"]), "--out", str(out))
    assert "--out" in line and "already exists" in line and out.read_text() == "mine"
    assert run_inprocess("eval", "--run", str(classifier["run"]), "--out", str(out), "--overwrite") == 0
    assert json.loads(out.read_text())["task"] == "sequence_classification"


# ---- the demo, announced ------------------------------------------------------------------------

def test_no_config_announces_the_demo_and_runs_its_recipe(capsys):
    assert run_inprocess("--print-config") == 0
    captured = capsys.readouterr()
    recipe = load_config(ROOT / "configs" / "smollm2-lora.yaml").to_dict()
    assert yaml.safe_load(captured.out) == recipe  # the YAML alone on stdout
    said = captured.err
    t = recipe["train"]
    assert "running the demo, configs/smollm2-lora.yaml" in said
    assert f"{t['max_steps']} of batch {t['batch_size']}" in said and f"{t['output_dir']}/" in said
    assert " min and " in said and " GB of memory" in said
