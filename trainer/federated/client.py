"""The client: T local optimizer steps of the trainer's own `train_step` from the global weights.

A client process builds its parts (data, partitions, model, adapter, optimizer) once and keeps
them for every message it serves: a Ray actor in simulation serves many virtual clients in turn;
under the deployment engine Flower starts a process per message, so there it builds per round.
Each round starts from the global weights with a fresh optimizer state (the paper's local SGD;
FedAvg's usual choice), and the data order, dropout and Ferret seed are functions of
(train.seed, round, client), so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import copy
import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from trainer.federated import wire
from trainer.federated.ferret import Coded, apply_coded, derive_seed, project
from trainer.federated.setup import Parts, build_parts
from trainer.job import train_step
from trainer.sampling import MicroBatchStream

# The global weights a Ferret node last synced to, and which round they are, in Context.state
STATE_WEIGHTS, STATE_SYNC = "ferret-weights", "ferret-sync"

_CACHE: dict[str, tuple[Parts, dict]] = {}


class SimulatedFailure(RuntimeError):
    """Raised by a client that `federated.simulate_failures` names for this round."""


class OutOfSync(RuntimeError):
    """The node's kept weights cannot be brought to the server's from the log it was sent."""


def parts_for(cfg) -> tuple[Parts, dict]:
    """This process's parts for `cfg` (and the optimizer's initial state), built once."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _CACHE:
        _CACHE.clear()  # one config per process: a new run replaces the old parts
        parts = build_parts(cfg)
        _CACHE[key] = (parts, copy.deepcopy(parts.job.optimizer.state_dict()))
    return _CACHE[key]


def client_id(context: Context, cfg) -> int:
    node = context.node_config
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    if n != cfg.federated.num_clients or not 0 <= pid < n:
        raise ValueError(f"node config partition-id={pid} num-partitions={n} does not fit "
                         f"federated.num_clients={cfg.federated.num_clients}")
    return pid


def local_train(parts: Parts, fresh_optimizer: dict, client: int, rnd: int) -> float:
    """`federated.local_steps` steps on this client's partition from the weights in the model;
    returns the mean step loss. The data order continues across rounds as if the client trained
    in every round (a pure function of seed, client and round)."""
    cfg, job = parts.cfg, parts.job
    fed, t = cfg.federated, cfg.train
    examples = parts.partitions[client]
    job.optimizer.load_state_dict(fresh_optimizer)
    stream = MicroBatchStream(len(examples), t.batch_size, derive_seed("data", t.seed, client) >> 32)  # it multiplies the seed
    first_step = (rnd - 1) * fed.local_steps
    stream.position = first_step * t.gradient_accumulation_steps
    torch.manual_seed(derive_seed("dropout", t.seed, client, rnd))
    job.model.train()
    losses = []
    for step in range(first_step, first_step + fed.local_steps):
        micro = [job.task.collate([examples[i] for i in stream.next_indices()]) for _ in range(t.gradient_accumulation_steps)]
        losses.append(float(train_step(job, micro, step).loss))
    return sum(losses) / len(losses)


def ferret_sync(parts: Parts, content: RecordDict, state: RecordDict) -> torch.Tensor:
    """The global weights of the previous round: this node's kept weights with the log replayed."""
    conf = content["config"]
    held = int(state[STATE_SYNC]["round"]) if STATE_SYNC in state else 0
    theta = (torch.from_numpy(state[STATE_WEIGHTS].to_numpy_ndarrays()[0].copy()) if held
             else parts.theta0.clone())
    if held < int(conf["from-round"]):
        raise OutOfSync(f"the node holds round {held}'s weights; the log sent starts after round {int(conf['from-round'])}")
    log = wire.decode_log(conf, content.get("log"), len(parts.blocks))
    exact = parts.cfg.federated.scaling == "exact"
    for rnd in sorted({e.round for e in log if e.round > held}):
        apply_coded(theta, [e.coded for e in log if e.round == rnd], parts.blocks, exact)
    target = float(conf["target-sqnorm"])
    have = float(theta.double().square().sum())
    if abs(have - target) > 1e-6 * max(target, 1e-12):
        raise OutOfSync(f"after replaying the log the weights' squared norm is {have!r}, the server's {target!r}: "
                        f"the node and the server do not share the initial weights (same model, adapter, train.seed?)")
    state[STATE_WEIGHTS] = ArrayRecord([theta.numpy()])
    state[STATE_SYNC] = ConfigRecord({"round": int(conf["target-round"])})
    return theta


def handle_train(msg: Message, context: Context, cfg) -> Message:
    fed = cfg.federated
    parts, fresh_optimizer = parts_for(cfg)
    client = client_id(context, cfg)
    conf = msg.content["config"]
    rnd = int(conf["round"])
    model = parts.job.trainable_model

    began = time.perf_counter()
    if fed.strategy == "ferret":
        theta = ferret_sync(parts, msg.content, context.state)
    else:
        theta = parts.travel.from_tensors(wire.weights_of(msg.content["arrays"]))
    parts.travel.load(model, theta)
    synced = time.perf_counter()
    loss = local_train(parts, fresh_optimizer, client, rnd)
    trained = time.perf_counter()
    if client in fed.simulate_failures.get(rnd, []):
        raise SimulatedFailure(f"client {client} fails in round {rnd} (federated.simulate_failures)")

    new = parts.travel.flat(model)
    metrics = {"num-examples": len(parts.partitions[client]), "client": client, "train-loss": loss,
               "sync-s": synced - began, "train-s": trained - synced}
    if fed.strategy == "ferret":
        seed = int(conf["seed"])
        counts, coeffs = project(theta - new, parts.blocks, seed, fed.num_bases, fed.min_bases_per_block, fed.scaling)
        records = wire.encode_coded(Coded(seed, tuple(counts), coeffs))
        metrics["project-s"] = time.perf_counter() - trained
    else:
        records = {"arrays": wire.weights_record(parts.travel.tensors(new))}
    return Message(content=RecordDict({**records, "metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_query(msg: Message, context: Context, cfg) -> Message:
    """Who this node is: the server maps its partition to the node id Flower gave it."""
    client = client_id(context, cfg)
    return Message(content=RecordDict({"node": ConfigRecord({"client": client})}), reply_to=msg)
