"""Federated settings: partitions, the config section, bad input refused before any client
starts (one line, exit 2, nothing written), and full fine-tuning of chosen layers."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from cli_runner import ROOT, run_inprocess
from trainer.config import load_config
from trainer.errors import UserError
from trainer.federated.partition import partition

FED_TINY = str(ROOT / "configs" / "fed-tiny.yaml")


def examples(sizes: dict[str, int]) -> list[dict]:
    return [{"input_ids": [i], "source": s} for s, n in sizes.items() for i in range(n)]


def test_iid_partition_is_a_shuffled_equal_split():
    rows = examples({"a": 50, "b": 50})  # in source order, as packaged corpora are
    parts = partition(rows, "iid", 4, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(100)) and [len(p) for p in parts] == [25] * 4
    assert all(0 < sum(rows[i]["source"] == "a" for i in p) < 25 for p in parts)  # shuffled, not contiguous shards
    assert partition(rows, "iid", 4, seed=0) == parts != partition(rows, "iid", 4, seed=1)


def test_by_source_keeps_sources_whole_and_balances_greedily():
    rows = examples({"trivia": 40, "ai": 30, "food": 20, "money": 15, "sport": 10, "art": 5})
    parts = partition(rows, "by_source", 3, seed=0)
    owners = {s: {c for c, p in enumerate(parts) for i in p if rows[i]["source"] == s} for s in {r["source"] for r in rows}}
    assert all(len(o) == 1 for o in owners.values())
    # largest first onto the lightest client: 40 | 30 | 20, then 15 -> 20's, 10 -> 30's, 5 -> 35's
    assert sorted(len(p) for p in parts) == [40, 40, 40]
    with pytest.raises(UserError, match="6 sources cannot fill 8 clients"):
        partition(rows, "by_source", 8, seed=0)


def test_dirichlet_partition_covers_everything_and_skews_sources():
    rows = examples({s: 60 for s in "abcde"})
    parts = partition(rows, "dirichlet", 5, seed=0, alpha=0.1, min_size=4)
    assert sorted(i for p in parts for i in p) == list(range(300)) and min(len(p) for p in parts) >= 4
    # alpha 0.1: each client is dominated by one or two sources (alpha 1e3 would be near-uniform)
    top_share = [Counter(rows[i]["source"] for i in p).most_common(1)[0][1] / len(p) for p in parts]
    assert sum(top_share) / len(top_share) > 0.6
    flat = partition(rows, "dirichlet", 5, seed=0, alpha=1000.0, min_size=4)
    assert max(Counter(rows[i]["source"] for i in p).most_common(1)[0][1] / len(p) for p in flat) < 0.4


def test_a_partition_needs_sources_and_a_batch_per_client():
    with pytest.raises(UserError, match="no 'source' field"):
        partition([{"input_ids": [1]}] * 10, "dirichlet", 2, seed=0)
    with pytest.raises(UserError, match="fewer than one batch of 8"):
        partition(examples({"a": 20}), "iid", 4, seed=0, min_size=8)


def test_chatterbot_rows_carry_their_topic():
    from trainer.data import load_rows
    rows = load_rows("packaged:chatterbot_qa", "data.path")
    topics = Counter(r["source"] for r in rows)
    assert len(topics) == 21 and topics["trivia"] == 341 and sum(topics.values()) == 1257


def test_federated_section_defaults_and_per_round_count():
    cfg = load_config(FED_TINY, ["federated.clients_per_round=0.5", "federated.num_clients=8"])
    assert cfg.federated.per_round == 4
    assert load_config(FED_TINY, ["federated.clients_per_round=3"]).federated.per_round == 3
    assert load_config(None).federated.strategy == "ferret"


@pytest.mark.parametrize("overrides,expected", [
    (["federated.clients_per_round=5"], "clients_per_round=5 is more than num_clients=4"),
    (["federated.clients_per_round=1.5"], "fraction above 1"),
    (["federated.min_replies=3"], "min_replies=3 is more than the 2 clients"),
    (["federated.bogus=1"], "unknown key 'federated.bogus'"),
    (["federated.strategy=fedprox"], "federated.strategy"),
    (["federated.simulate_failures={2: [7]}"], "client outside 0..3"),
    (["adapter.type=triadaptlora"], "changes the shape of its parameters"),
    (["federated.strategy=fedit", "adapter.type=none"], "fedit averages adapter parameters"),
    (["federated.stop_after_rounds=3"], "stop_after_rounds=3 is not before the last round"),
    (["federated.num_clients=30", "federated.clients_per_round=2"], "21 sources cannot fill 30 clients"),
    (["federated.partition=dirichlet", "data.path=packaged:hamlet", "data.format=text"], "no 'source' field"),
    (["federated.partition=iid", "federated.num_clients=400", "federated.clients_per_round=2"], "fewer than one batch of 4"),
    (["federated.num_bases=100000"], "num_bases=100000 is more than the 1792 values"),
    (["federated.num_bases=3", "federated.block_size=64"], "cannot give each of the 28 blocks"),
    (["federated.scaling=exact", "federated.block_size=8192", "adapter.type=none"], "too large for that"),
    (["federated.client_cpus=64"], "federated.client_cpus=64 is more than"),
])
def test_bad_federated_settings_are_one_line_and_exit_2(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    rc = run_inprocess("federated", "--config", FED_TINY, f"train.output_dir={out}", *overrides)
    # (a note may say which of the recipe's adapter options a switched adapter.type drops)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note:")]
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_full_fine_tuning_of_chosen_layers(tiny_llama):
    import adapters
    from adapters.full import FullOptions

    model, _ = adapters.ADAPTERS["none"].build(tiny_llama, FullOptions(trainable=[r"layers\.1\.mlp"]),
                                               adapters.BuildContext("causal_lm", 10, 0))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("layers.1.mlp" in n for n in trained)
    assert len(trained) == sum("layers.1.mlp" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="matches no parameter"):
        adapters.ADAPTERS["none"].build(tiny_llama, FullOptions(trainable=["nope"]), adapters.BuildContext("causal_lm", 10, 0))
    with pytest.raises(UserError, match="not a regular expression"):
        load_config(FED_TINY, ["adapter.type=none", "adapter.trainable=['(']"])
    assert torch.is_tensor(next(model.parameters()))
