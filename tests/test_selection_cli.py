"""`train.py select` end to end on tiny models: the output a trainer reads, the embedding cache
(reused across methods and budgets, resumed after a kill), the Ray Data engine, and bad input as a
new user types it (one line, exit 2, nothing written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import ROOT, run_inprocess
from trainer.data import load_rows
from trainer.selection.chunking import chunk_documents
from trainer.selection.corpus import read_texts

CONFIG = str(ROOT / "configs" / "select-tiny.yaml")
WORDS = "the film plot actor scene story music camera drama comedy night city river war love".split()


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def corpus(path: Path, n: int, seed: int, words=WORDS) -> str:
    rng = np.random.default_rng(seed)
    return write_jsonl(path, [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) for _ in range(n)])


def select_args(tmp_path: Path, *extra: str) -> list[str]:
    pool = [corpus(tmp_path / "films.jsonl", 60, 0), "packaged:chatterbot_qa"]
    return ["select", "--config", CONFIG, f"selection.pool=[{','.join(pool)}]",
            f"selection.target={corpus(tmp_path / 'target.jsonl', 10, 1)}", "selection.chunk_chars=0",
            f"selection.cache_dir={tmp_path / 'cache'}", f"selection.output_dir={tmp_path / 'sel'}", *extra]


def summary(out: Path) -> dict:
    return json.loads((out / "selection.json").read_text())


def test_select_writes_a_dataset_the_trainer_reads_and_reuses_the_cache(tmp_path, capsys):
    assert run_inprocess(*select_args(tmp_path, "selection.budget=30")) == 0
    out = tmp_path / "sel"
    rows = load_rows(str(out / "selected.jsonl"), "data.path")
    assert len(rows) == 30 and [r["rank"] for r in rows] == list(range(1, 31))
    assert {"text", "source", "score", "rank"} <= set(rows[0])
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores)  # got_d: most negative gradient first
    info = summary(out)
    assert info["ot"]["converged"] and info["selected"] == 30
    assert sum(info["selected_counts"].values()) == 30 and set(info["pool_counts"]) == {"films", "chatterbot_qa"}
    # every distinct chunk of pool and target embedded once (the cache is keyed by text: repeats are hits)
    texts = [c.text for path in (tmp_path / "films.jsonl", "packaged:chatterbot_qa", tmp_path / "target.jsonl")
             for c in chunk_documents(read_texts(str(path), "t"), 0)]
    assert info["embedder"]["embedded"] == len(set(texts)) < info["pool_chunks"] + info["target_chunks"]
    assert (out / "selection.png").stat().st_size > 0

    # another method and budget on the same pool: every vector comes from the cache
    assert run_inprocess(*select_args(tmp_path, "selection.method=nearest", "selection.budget=0.1",
                                      "--overwrite")) == 0
    again = summary(out)
    assert again["method"] == "nearest" and again["selected"] == round(0.1 * again["pool_chunks"])
    assert again["embedder"]["embedded"] == 0 and again["embedder"]["cache_hits"] > 0
    # and the selection trains: one step of the tiny model on it
    assert run_inprocess("--config", CONFIG, f"data.path={out / 'selected.jsonl'}", "train.max_steps=1",
                         "data.eval_fraction=0", f"train.output_dir={tmp_path / 'run'}") == 0


def test_embedding_resumes_after_a_kill(tmp_path):
    """SIGKILL `select` once a few cache shards exist; the rerun embeds only the rest, and the
    selection equals one made from scratch."""
    pool = corpus(tmp_path / "big.jsonl", 3000, 2)
    args = ["select", "--config", CONFIG, f"selection.pool=[{pool}]", "selection.chunk_chars=0",
            f"selection.target={corpus(tmp_path / 'target.jsonl', 10, 1)}", "selection.budget=50",
            "selection.cache_flush_every=64", "selection.embed_batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"selection.cache_dir={tmp_path / 'c'}",
                              f"selection.output_dir={tmp_path / 'a'}"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "c").glob("*/part-*"))) < 3:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    shards = list((tmp_path / "c").glob("*/part-*"))
    assert len(shards) >= 3 and not (tmp_path / "a").exists()
    stored = sum(len(np.load(shard / "hashes.npy")) for shard in shards)  # the target's shard, then pool shards
    assert run_inprocess(*args, f"selection.cache_dir={tmp_path / 'c'}", f"selection.output_dir={tmp_path / 'a'}") == 0
    resumed = summary(tmp_path / "a")["embedder"]
    assert run_inprocess(*args, f"selection.cache_dir={tmp_path / 'fresh'}", f"selection.output_dir={tmp_path / 'b'}") == 0
    fresh = summary(tmp_path / "b")["embedder"]
    # the rerun read back every vector stored before the kill and embedded exactly the rest
    assert resumed["cache_hits"] >= stored and 0 < resumed["embedded"] == fresh["embedded"] - stored
    picked = lambda d: [json.loads(line)["text"] for line in (d / "selected.jsonl").read_text().splitlines()]  # noqa: E731
    assert picked(tmp_path / "a") == picked(tmp_path / "b")


def test_ray_data_engine_embeds_like_the_local_one(tmp_path):
    pytest.importorskip("ray")
    base = select_args(tmp_path, "selection.budget=20", "selection.method=nearest")
    assert run_inprocess(*base) == 0
    ray_args = [a.replace(str(tmp_path / "cache"), str(tmp_path / "ray-cache")).replace(str(tmp_path / "sel"), str(tmp_path / "ray"))
                for a in base]
    assert run_inprocess(*ray_args, "selection.engine=ray", "selection.ray.num_cpus=2", "selection.ray.workers=2") == 0
    import ray
    assert not ray.is_initialized()  # the run shut down the Ray it started
    local, remote = (load_rows(str(tmp_path / d / "selected.jsonl"), "x") for d in ("sel", "ray"))
    assert [r["text"] for r in local] == [r["text"] for r in remote]
    np.testing.assert_allclose([r["score"] for r in remote], [r["score"] for r in local], atol=1e-5)
    assert summary(tmp_path / "ray")["embedder"]["embedded"] == summary(tmp_path / "sel")["embedder"]["embedded"]


def nan_model(folder: Path) -> str:
    """A bert folder whose weights are NaN: loads fine, embeds NaN."""
    from transformers import BertConfig, BertModel

    from trainer.models import MINILM_PACKAGE, package_dir
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = package_dir(MINILM_PACKAGE) / "model" / name
        if source.exists():
            (folder / name).write_bytes(source.read_bytes())
    return str(folder)


BAD = {
    # name: (extra args, text the error line must contain)
    "empty pool": (["selection.pool=[]"], ["selection.pool", "empty"]),
    "empty target": (["selection.target={tmp}/empty.jsonl"], ["selection.target", "no rows"]),
    "budget larger than the pool": (["selection.budget=100000"], ["selection.budget", "larger than the pool"]),
    "unknown packaged source": (["selection.pool=[packaged:hamlett]"], ["selection.pool[0]", "hamlett"]),
    "missing pool file": (["selection.pool=[{tmp}/nope.jsonl]"], ["selection.pool[0]", "nope.jsonl"]),
    "broken pool line": (["selection.pool=[{tmp}/broken.jsonl]"], ["broken.jsonl:2", "invalid JSON"]),
    "embedder that cannot load": (["selection.embedder={tmp}/no-such-model"], ["selection.embedder", "no-such-model"]),
    "embedder folder without weights": (["selection.embedder={tmp}/empty-model"], ["selection.embedder", "cannot load"]),
    "non-finite embeddings": (["selection.embedder={tmp}/nan-model"], ["selection.embedder", "non-finite"]),
    "OT that does not converge": (["selection.ot.max_iter=1", "selection.ot.tol=1e-12"],
                                  ["selection.ot", "did not converge", "marginal error", "max_iter"]),
    "unknown method": (["selection.method=gotd"], ["selection.method", "got_d"]),
    "unknown selection key": (["selection.budgett=5"], ["selection.budgett", "did you mean selection.budget"]),
    "fractional budget above one": (["selection.budget=2.5"], ["selection.budget", "fraction below 1"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_selection_input_is_one_clear_line_and_writes_nothing(name, tmp_path, capsys):
    extra, needles = BAD[name]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (tmp_path / "empty-model").mkdir()
    if name == "non-finite embeddings":
        nan_model(tmp_path / "nan-model")
    args = select_args(tmp_path, "selection.budget=10", *[e.format(tmp=tmp_path) for e in extra])
    if name != "OT that does not converge":  # the cache may keep vectors of a run that failed later
        args = [a for a in args if not a.startswith("selection.cache_dir=")] + [f"selection.cache_dir={tmp_path / 'cache'}"]
    capsys.readouterr()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = run_inprocess(*args)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "Warning" not in line and "warnings.warn" not in line and "%|" not in line]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not (tmp_path / "sel").exists()
    if name != "OT that does not converge":
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_select_refuses_to_overwrite_a_selection(tmp_path, capsys):
    assert run_inprocess(*select_args(tmp_path, "selection.budget=5", "selection.method=random")) == 0
    before = (tmp_path / "sel" / "selected.jsonl").read_text()
    assert run_inprocess(*select_args(tmp_path, "selection.budget=6", "selection.method=random")) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (tmp_path / "sel" / "selected.jsonl").read_text() == before


def test_prefilter_keeps_the_sources_closest_in_ot_distance(tmp_path):
    """The per-source pre-filter's distances are POT's entropic transport costs (sinkhorn2) between
    each source's sample and the target, computed here from the cached vectors; only the closest
    source stays in the pool. The embedder is the model being tuned (tiny:llama, mean-pooled)."""
    import ot as pot

    from trainer.selection.cache import EmbeddingCache, text_hash
    from trainer.selection.embed import EmbedderSpec

    args = select_args(tmp_path, "selection.budget=5", "selection.embedder=model", "selection.prefilter.keep=1",
                       "selection.prefilter.sample=40", "selection.ot.dtype=float64", "selection.ot.tol=1e-9")
    assert run_inprocess(*args) == 0
    info = summary(tmp_path / "sel")
    assert info["embedder"]["model"] == "tiny:llama"
    distances = info["prefilter"]["distances"]
    assert info["prefilter"]["kept"] == [min(distances, key=distances.get)]
    assert set(info["pool_counts"]) == set(info["prefilter"]["kept"])
    spec = EmbedderSpec("tiny:llama", 64, True, 32, "cpu")
    cache = EmbeddingCache(tmp_path / "cache", spec.key())
    target = cache.get([text_hash(t) for t in read_texts(str(tmp_path / "target.jsonl"), "t")])
    rng = np.random.default_rng(0)  # the pre-filter's sample: seeded by selection.seed, sources in order
    for name, path in (("films", str(tmp_path / "films.jsonl")), ("chatterbot_qa", "packaged:chatterbot_qa")):
        texts = [c.text for c in chunk_documents(read_texts(path, "p"), 0)]
        picked = sorted(rng.choice(len(texts), size=min(40, len(texts)), replace=False).tolist())
        sample = cache.get([text_hash(texts[i]) for i in picked])
        reference = pot.sinkhorn2(np.full(len(target), 1 / len(target)), np.full(len(sample), 1 / len(sample)),
                                  pot.dist(target.astype(np.float64), sample.astype(np.float64)), 0.1,
                                  method="sinkhorn_log", stopThr=1e-12, numItermax=100000)
        assert distances[name] == pytest.approx(float(reference), rel=1e-6)


@pytest.mark.parametrize("method", ["random", "dsir"])
def test_seed_override_repeats_a_draw_and_another_seed_changes_it(method, tmp_path):
    """`selection.seed=N` as typed on the command line: the same seed gives the same rows in the
    same order, another seed another draw (random and DSIR sample; neither needs embeddings)."""
    def picked(seed: int, folder: str) -> list[str]:
        out = tmp_path / folder
        assert run_inprocess(*select_args(tmp_path, "selection.budget=12", f"selection.method={method}",
                                          f"selection.seed={seed}", f"selection.output_dir={out}")) == 0
        assert summary(out)["selection_section"]["seed"] == seed
        return [json.loads(line)["text"] for line in (out / "selected.jsonl").read_text().splitlines()]

    first = picked(0, "a")
    assert picked(0, "b") == first
    assert picked(1, "c") != first
