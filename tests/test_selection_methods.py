"""The selection methods on constructed cases with a known answer, each checked against an
independent computation: GOT-D's pick lowers POT's exact OT distance to the target more than the
others' (the paper's Theorem 1), nearest equals a brute-force round-robin k-NN, DSIR's weights
equal the authors' `data-selection` pipeline run on files; plus chunking and the embedding cache."""
from __future__ import annotations

import json

import numpy as np
import ot as pot
import pytest

from trainer.selection import methods
from trainer.selection.cache import EmbeddingCache, text_hash
from trainer.selection.chunking import SEPARATOR, chunk_documents, split_long
from trainer.selection.config import DSIROptions, OTOptions

OT = OTOptions(epsilon=0.05, tol=1e-6, max_iter=5000, dtype="float64")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blob(rng, center, n, spread):
    return unit(center + spread * rng.normal(size=(n, len(center))))


def test_two_clusters_got_d_and_nearest_take_the_side_near_the_target():
    rng = np.random.default_rng(0)
    near, far = unit(rng.normal(size=(1, 16)))[0], unit(rng.normal(size=(1, 16)))[0]
    pool = np.vstack([blob(rng, near, 40, 0.1), blob(rng, far, 40, 0.1)])
    target = blob(rng, near, 12, 0.1)
    for ranking in (methods.got_d(pool, target, 20, OT, "cpu"), methods.nearest(pool, target, 20)):
        assert (ranking.order < 40).all()
    assert methods.got_d(pool, target, 20, OT, "cpu").info["ot"]["converged"]


def ot_distance(target, pool, weights):
    return pot.emd2(np.full(len(target), 1 / len(target)), weights / weights.sum(), pot.dist(target, pool))


def test_got_d_selects_what_moves_the_pool_toward_the_target():
    """Target: two modes, half each. Pool: 80 chunks exactly on mode A, 20 near (not on) mode B.
    Nearest neighbours favour A (closest); GOT-D takes the under-represented B side, and adding its
    selection to the pool lowers the exact OT distance (POT's emd2) more than any other method's."""
    rng = np.random.default_rng(1)
    mode_a, mode_b = unit(rng.normal(size=(1, 8)))[0], unit(rng.normal(size=(1, 8)))[0]
    target = np.vstack([blob(rng, mode_a, 10, 0.05), blob(rng, mode_b, 10, 0.05)])
    near_b = unit(mode_b[None] + 0.25 * unit(rng.normal(size=(1, 8))))[0]  # unit() normalises rows
    pool = np.vstack([blob(rng, mode_a, 80, 0.05), blob(rng, near_b, 20, 0.05)])
    budget = 15
    picks = {"got_d": methods.got_d(pool, target, budget, OT, "cpu").order,
             "nearest": methods.nearest(pool, target, budget).order,
             "random": methods.random(len(pool), budget, seed=0).order}
    assert (picks["got_d"] >= 80).all()  # all from the B side
    assert (picks["nearest"] < 80).sum() > (picks["nearest"] >= 80).sum()  # mostly the closer A side
    base = np.ones(len(pool))
    moved = {}
    for name, order in picks.items():
        weights = base.copy()
        weights[order] += 0.2 * len(pool) / budget  # lambda = 0.2 of the pool's mass on the selection
        moved[name] = ot_distance(target, pool, weights)
    assert moved["got_d"] < moved["nearest"] and moved["got_d"] < moved["random"]
    assert moved["got_d"] < ot_distance(target, pool, base)


def brute_force_round_robin(pool, target, budget):
    sims = unit(target) @ unit(pool).T
    order, taken = [], set()
    neighbours = np.argsort(-sims, axis=1, kind="stable")
    for rank in range(pool.shape[0]):
        column = neighbours[:, rank]
        for t in np.argsort(-sims[np.arange(len(target)), column], kind="stable"):
            c = int(column[t])
            if c not in taken:
                taken.add(c)
                order.append(c)
            if len(order) == budget:
                return order
    return order


@pytest.mark.parametrize("budget", [1, 7, 30, 64])
def test_nearest_is_round_robin_k_nn_over_the_targets(budget):
    rng = np.random.default_rng(2)
    pool, target = rng.normal(size=(64, 10)), rng.normal(size=(5, 10))
    ranking = methods.nearest(pool, target, budget)
    assert ranking.order.tolist() == brute_force_round_robin(pool, target, budget)
    np.testing.assert_allclose(ranking.scores, (unit(pool) @ unit(target).T).max(axis=1), atol=1e-5)


REVIEWS = ["a gripping, beautifully acted film with a clever script", "the plot drags and the acting is wooden",
           "a charming comedy that never overstays its welcome", "visually stunning but emotionally hollow film",
           "one of the best thrillers of the year, tense and smart", "a dull, lifeless remake of a classic film"]
PLAY = ["To be, or not to be, that is the question", "Something is rotten in the state of Denmark",
        "Though this be madness, yet there is method in it", "The lady doth protest too much, methinks",
        "Alas, poor Yorick! I knew him, Horatio", "Get thee to a nunnery, why wouldst thou be a breeder"]


def test_dsir_weights_equal_the_authors_package_run_on_files(tmp_path):
    from data_selection import HashedNgramDSIR

    pool = PLAY + REVIEWS[:3] + ["the film is a quiet drama about a family", "rotten, dull and far too long"]
    target = REVIEWS[3:] + ["a clever film with a gripping script"]
    for name, texts in (("pool", pool), ("target", target)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    reference = HashedNgramDSIR([str(tmp_path / "pool.jsonl")], [str(tmp_path / "target.jsonl")],
                                cache_dir=str(tmp_path / "cache"), num_proc=1, ngrams=2, num_buckets=10000,
                                min_example_length=0)
    reference.fit_importance_estimator(num_tokens_to_fit="all")
    reference.compute_importance_weights()
    expected = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    ours = methods.dsir_log_weights(pool, target, ngrams=2, buckets=10000)
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    # top_k takes the largest importance weights, ranked by the package's own weights. (Not "the
    # reviews outrank the play": one line of the play outranks a review here, as the weights say.)
    top = methods.dsir(pool, target, 5, DSIROptions(top_k=True), seed=0).order
    assert list(top) == list(np.argsort(-expected, kind="stable")[:5])


def test_dsir_sampling_is_seeded_gumbel_top_k_without_replacement():
    pool = PLAY + REVIEWS
    target = REVIEWS
    weights = methods.dsir_log_weights(pool, target, 2, 10000)
    a = methods.dsir(pool, target, 6, DSIROptions(), seed=3).order
    assert a.tolist() == methods.dsir(pool, target, 6, DSIROptions(), seed=3).order.tolist()
    assert len(set(a.tolist())) == 6
    keys = weights + np.random.default_rng(3).gumbel(size=len(pool))
    assert a.tolist() == np.argsort(-keys, kind="stable")[:6].tolist()


def test_random_is_seeded_and_without_replacement():
    a = methods.random(100, 40, seed=5).order
    assert len(set(a.tolist())) == 40 and a.tolist() == methods.random(100, 40, seed=5).order.tolist()
    assert a.tolist() != methods.random(100, 40, seed=6).order.tolist()


def test_chunks_split_long_documents_and_join_short_ones_within_a_source():
    long_doc = " ".join(f"word{i}" for i in range(400))
    pieces = split_long(long_doc, 100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces) == long_doc
    docs = ["short one.", "short two.", long_doc, "tail."]
    chunks = chunk_documents(docs, 100)
    assert all(len(c.text) <= 100 for c in chunks)
    assert chunks[0].text == "short one." + SEPARATOR + "short two." and chunks[0].first_row == 0
    assert chunks[1].first_row == 2
    joined = " ".join(" ".join(c.text.split(SEPARATOR)) for c in chunks)
    assert joined.split() == " ".join(docs).split()  # nothing lost, nothing reordered
    assert [c.text for c in chunk_documents(docs, 0)] == docs  # 0 keeps documents whole
    assert [c.text for c in chunk_documents(["abc", "abcdefgh"], 0, min_chars=5)] == ["abcdefgh"]


def test_cache_round_trip_survives_a_reload_and_ignores_half_written_shards(tmp_path):
    texts = [f"text {i}" for i in range(10)]
    hashes = [text_hash(t) for t in texts]
    hashes[3] = hashes[3][:-2] + b"\x00\x00"  # trailing zero bytes must survive the round trip
    vectors = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    cache = EmbeddingCache(tmp_path, "embedder-a", flush_every=4)
    cache.add(hashes[:6], vectors[:6])  # flushes one shard of 6
    assert cache.missing(hashes) == [6, 7, 8, 9]
    (cache.dir / ".tmp-part-crashed").mkdir()  # a save killed before its rename
    again = EmbeddingCache(tmp_path, "embedder-a")
    assert again.missing(hashes) == [6, 7, 8, 9]
    np.testing.assert_array_equal(again.get(hashes[:6]), vectors[:6])
    again.add(hashes[6:], vectors[6:])
    again.flush()
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "embedder-a").get(hashes), vectors)
    assert EmbeddingCache(tmp_path, "embedder-b").missing(hashes) == list(range(10))  # keyed by embedder
