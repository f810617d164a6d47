"""Federated rounds without Ray: the ClientApp's handler and the strategies called directly on
the tiny model, checked against hand-computed aggregates (weighted means, peft's own LoRA state
dict, the Ferret maths applied by hand)."""
from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import get_peft_model_state_dict

from cli_runner import ROOT
from trainer.config import load_config
from trainer.federated import ferret, wire
from trainer.federated.client import STATE_WEIGHTS, handle_train
from trainer.federated.server import prepare
from trainer.federated.strategy import FedAvgStrategy, FerretStrategy

FED_TINY = str(ROOT / "configs" / "fed-tiny.yaml")
NODES = {client: 100 + client for client in range(4)}  # client id -> a node id, as Flower would assign


@pytest.fixture(autouse=True)
def server_identity():
    """Messages take their run and sender from the task identity, which Flower's runtime sets."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def setup(tmp_path, *overrides):
    cfg = load_config(FED_TINY, [f"train.output_dir={tmp_path / 'run'}", "federated.clients_per_round=3", *overrides])
    server = prepare(cfg)
    strategy = (FerretStrategy if cfg.federated.strategy == "ferret" else FedAvgStrategy)(cfg, server.state, NODES)
    contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": c, "num-partitions": 4},
                              state=RecordDict(), run_config={}) for c, node in NODES.items()}
    return server, strategy, contexts


def play(server, strategy, contexts, rnd: int, fail: tuple[int, ...] = ()) -> dict[int, Message]:
    """One round: configure, every sampled client trains (or fails), aggregate. Client -> reply."""
    replies = {}
    for msg in strategy.configure_train(rnd, server.state.arrays(), ConfigRecord(), None):
        client = msg.metadata.dst_node_id - 100
        if client in fail:
            replies[client] = Message(Error(code=0, reason="client crashed"), reply_to=msg)
        else:
            replies[client] = handle_train(msg, contexts[msg.metadata.dst_node_id], server.cfg)
    strategy.aggregate_train(rnd, list(replies.values()))
    server.state.round = rnd
    return replies


def weighted_mean(replies: dict[int, Message]) -> torch.Tensor:
    """sum_i n_i w_i / sum_i n_i over the clients' returned weights, in float64, by hand."""
    total, count = None, 0
    for msg in replies.values():
        if msg.has_error():
            continue
        n = int(msg.content["metrics"]["num-examples"])
        flat = torch.cat([torch.from_numpy(a.numpy().copy()).double().reshape(-1) for a in msg.content["arrays"].values()])
        total = n * flat if total is None else total + n * flat
        count += n
    return total / count


def paper_reconstruction(blocks, seed, counts, coeffs, dim) -> torch.Tensor:
    """sum over blocks of V_l^T gamma_l (the paper's eq. 8), in float64, one block at a time."""
    out, at = torch.zeros(dim, dtype=torch.float64), 0
    for index, (block, k) in enumerate(zip(blocks, counts)):
        v = ferret.bases(seed, index, k, block.size).double()
        out[block.start:block.stop] = v.T @ coeffs[at:at + k].double()
        at += k
    return out


@pytest.mark.parametrize("overrides", [
    ["federated.strategy=fedavg", "adapter.type=none", "adapter.trainable=['layers\\.1\\.']", "optim.name=sgd",
     "optim.lr=0.05"],
    ["federated.strategy=fedit"],
], ids=["fedavg-full-layer", "fedit-lora"])
def test_fedavg_and_fedit_take_the_weighted_mean(tmp_path, overrides):
    server, strategy, contexts = setup(tmp_path, *overrides)
    theta0 = server.state.theta.clone()
    replies = play(server, strategy, contexts, 1)
    assert len(replies) == 3 and strategy.report["aggregated"] == 3
    expected = weighted_mean(replies)
    assert torch.allclose(server.state.theta.double(), expected, atol=1e-6)
    assert not torch.allclose(server.state.theta, theta0)
    model = server.parts.job.trainable_model
    if server.cfg.federated.strategy == "fedit":
        # what travels is exactly peft's LoRA state dict, nothing of the base model
        lora = get_peft_model_state_dict(model)
        assert len(lora) == len(server.state.travel.names) and all("lora_" in k for k in lora)
        assert sum(v.numel() for v in lora.values()) == server.state.travel.dim
    else:
        assert all(".layers.1." in n for n in server.state.travel.names)
        assert len(server.state.travel.names) == sum(".layers.1." in n for n, _ in model.named_parameters())
    # server_lr scales the step from the old weights towards the mean
    server2, strategy2, contexts2 = setup(tmp_path, *overrides, "federated.server_lr=0.5")
    play(server2, strategy2, contexts2, 1)
    assert torch.allclose(server2.state.theta.double(), theta0.double() + 0.5 * (expected - theta0.double()), atol=1e-6)


def test_ferret_with_a_full_orthonormal_basis_gives_fedavgs_update(tmp_path):
    fedavg, s1, c1 = setup(tmp_path, "federated.strategy=fedavg")
    exact, s2, c2 = setup(tmp_path, "federated.scaling=exact", "federated.block_size=256")
    for rnd in (1, 2):
        play(fedavg, s1, c1, rnd)
        play(exact, s2, c2, rnd)
        assert torch.allclose(exact.state.theta, fedavg.state.theta, atol=1e-5)
    assert s2.report["clients"][s2.report["sampled"][0]]["bytes_up"] > 4 * exact.state.travel.dim  # as heavy as FedAvg


def test_ferret_aggregates_reconstructions_and_nodes_replay_them_exactly(tmp_path):
    server, strategy, contexts = setup(tmp_path, "federated.clients_per_round=2")
    fed, blocks, dim = server.cfg.federated, server.state.blocks, server.state.travel.dim
    theta = server.state.theta.clone()
    for rnd in (1, 2, 3):
        before = server.state.theta.clone()
        replies = play(server, strategy, contexts, rnd)
        # the server's step by hand: theta -= server_lr * sum_i n_i/N * V_i^T gamma_i
        sizes = {c: int(m.content["metrics"]["num-examples"]) for c, m in replies.items()}
        step = torch.zeros(dim, dtype=torch.float64)
        for c, msg in replies.items():
            coded = wire.decode_coded(msg.content)
            assert coded.seed == strategy.client_seed(rnd, c) and sum(coded.counts) == fed.num_bases
            step += sizes[c] / sum(sizes.values()) * paper_reconstruction(blocks, coded.seed, coded.counts, coded.coeffs, dim)
        assert torch.allclose(server.state.theta.double(), before.double() - fed.server_lr * step, atol=1e-6)
        # a client replayed the log to the global weights of the round before, bit for bit
        for c in replies:
            kept = contexts[NODES[c]].state[STATE_WEIGHTS].to_numpy_ndarrays()[0]
            assert torch.equal(torch.from_numpy(kept.copy()), before)
        # coefficients and a seed go up: K floats plus Flower's framing and the metrics
        up = [strategy.report["clients"][c]["bytes_up"] for c in replies]
        assert all(4 * fed.num_bases < b < 4 * fed.num_bases + 2500 for b in up)
    assert server.state.round == 3 and len(server.state.log) == 6
    assert not torch.equal(server.state.theta, theta)


def test_a_failed_client_is_left_out_and_too_few_replies_change_nothing(tmp_path):
    server, strategy, contexts = setup(tmp_path, "federated.strategy=fedavg", "federated.min_replies=2")
    replies = play(server, strategy, contexts, 1, fail=(strategy.sampled(1)[0],))
    assert strategy.report["aggregated"] == 2 and list(strategy.report["failed"]) == [strategy.sampled(1)[0]]
    assert torch.allclose(server.state.theta.double(), weighted_mean(replies), atol=1e-6)  # the two that arrived
    kept = server.state.theta.clone()
    play(server, strategy, contexts, 2, fail=tuple(strategy.sampled(2)[:2]))
    assert strategy.report["aggregated"] == 0 and len(strategy.report["failed"]) == 2
    assert torch.equal(server.state.theta, kept)


def test_ferret_resends_the_whole_log_to_a_node_that_failed(tmp_path):
    server, strategy, contexts = setup(tmp_path, "federated.clients_per_round=4")
    play(server, strategy, contexts, 1, fail=(2,))
    assert strategy.report["aggregated"] == 3
    assert NODES[2] not in strategy.synced and NODES[0] in strategy.synced
    play(server, strategy, contexts, 2)  # node 2 holds round 0's weights: it replays round 1's three updates
    down = {c: v["bytes_down"] for c, v in strategy.report["clients"].items()}
    # everyone needed round 1's log (the messages differ only in their seeds' varint lengths)
    assert abs(down[2] - down[0]) <= 4 and strategy.report["aggregated"] == 4
    play(server, strategy, contexts, 3, fail=(1,))
    play(server, strategy, contexts, 4)
    down = {c: v["bytes_down"] for c, v in strategy.report["clients"].items()}
    assert down[1] > down[0]  # node 1 is sent rounds 2 and 3, the others round 3 only


# the public interface, as written there
PUBLIC = ["federated.num_clients=8", "federated.rounds=5", "federated.clients_per_round=4", "federated.local_steps=10",
          "federated.alpha=0.5", "federated.num_bases=256", "federated.server_lr=1.0"]


def test_the_public_overrides_do_what_they_say(tmp_path, monkeypatch):
    import trainer.federated.client as client_module
    from trainer.federated.partition import partition

    steps = []  # the trainer's own step, counted as it runs
    real_step = client_module.train_step
    monkeypatch.setattr(client_module, "train_step", lambda job, micro, step: steps.append(step) or real_step(job, micro, step))
    nodes = {c: 100 + c for c in range(8)}
    cfg = load_config(FED_TINY, [f"train.output_dir={tmp_path / 'run'}", *PUBLIC, "federated.strategy=ferret",
                                 "federated.partition=dirichlet"])
    assert (cfg.federated.rounds, cfg.federated.local_steps, cfg.federated.alpha, cfg.federated.server_lr) == (5, 10, 0.5, 1.0)
    server = prepare(cfg)
    parts, train_set = server.parts.partitions, server.parts.job.train_set
    assert len(parts) == 8 and all(len(p) >= cfg.train.batch_size for p in parts)
    assert sum(map(len, parts)) == len(train_set)
    s = FerretStrategy(cfg, server.state, nodes)
    contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": c, "num-partitions": 8},
                              state=RecordDict(), run_config={}) for c, node in nodes.items()}
    replies = play(server, s, contexts, 1)
    assert len(replies) == 4 and s.report["aggregated"] == 4  # 4 of the 8 clients
    # local_steps=10: ten steps per client, at the LR schedule's positions 0..9 of 5 x 10
    assert steps == list(range(10)) * 4 and server.parts.job.cfg.train.max_steps == 50
    for msg in replies.values():
        assert sum(wire.decode_coded(msg.content).counts) == 256  # num_bases=256
        assert int(msg.content["metrics"]["num-examples"]) == len(parts[int(msg.content["metrics"]["client"])])
    # the other partitions over the same examples: by_source keeps each of the 21 topics on one
    # client, iid is a shuffle that gives every client many topics, and Dirichlet lies between
    def topics(method):
        return [{train_set[i]["source"] for i in p} for p in partition(train_set, method, 8, cfg.train.seed, 0.5, 4)]
    by_source, iid, dirichlet = topics("by_source"), topics("iid"), [{e["source"] for e in p} for p in parts]
    assert sum(map(len, by_source)) == len(set().union(*by_source)) == 21
    assert min(map(len, iid)) >= 15 and sum(map(len, by_source)) < sum(map(len, dirichlet)) < sum(map(len, iid))
