"""What travels in Flower messages, and how many bytes it takes.

FedAvg / FedIT: the global weights down, the client's weights up (`arrays`, an ArrayRecord of
named tensors), as Flower's own FedAvg expects.

Ferret: up, the client's seed and K_l per block (`ferret`, a ConfigRecord) and its coefficients
(`coeffs`, one fp32 array). Down, no weights: the aggregated updates of the rounds the node has
not applied yet (`config` log-* fields and `log`, one fp32 array of every update's weighted
coefficients), which the node replays onto the global weights it kept from its last round
(in its `Context.state`, which Flower keeps on the node). Every node starts from the same
initial weights (the same base model and seeded adapter), as in the paper.

Bytes are counted on Flower's serialized form: the message and every record, array and chunk
object below it, as `deflate()` writes them for transport (an object is sent once per message).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from trainer.federated.ferret import Coded


def wire_bytes(msg: Message) -> int:
    """Serialized size of a message: the sum of the deflated objects of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


@dataclass(frozen=True)
class LogEntry:
    """One client's contribution to one round, as the server applied it: the coefficients already
    carry server_lr and the client's weight, so replaying the log reproduces the global weights."""

    round: int
    client: int
    coded: Coded


def encode_log(entries: list[LogEntry]) -> tuple[dict, ArrayRecord | None]:
    """(ConfigRecord fields, ArrayRecord or None) carrying `entries`."""
    fields = {"log-rounds": [e.round for e in entries], "log-seeds": [e.coded.seed for e in entries],
              "log-counts": [c for e in entries for c in e.coded.counts]}
    if not entries:
        return fields, None
    coeffs = torch.cat([e.coded.coeffs for e in entries]).numpy()
    return fields, ArrayRecord([coeffs])


def decode_log(config: ConfigRecord, arrays: ArrayRecord | None, num_blocks: int) -> list[LogEntry]:
    rounds, seeds, counts = list(config["log-rounds"]), list(config["log-seeds"]), list(config["log-counts"])
    if len(counts) != num_blocks * len(rounds):
        raise ValueError(f"the log holds {len(counts)} block counts for {len(rounds)} updates of {num_blocks} blocks")
    flat = _one_array(arrays) if rounds else torch.zeros(0)
    entries, at = [], 0
    for i, (rnd, seed) in enumerate(zip(rounds, seeds)):
        c = tuple(int(x) for x in counts[i * num_blocks:(i + 1) * num_blocks])
        entries.append(LogEntry(int(rnd), -1, Coded(int(seed), c, flat[at:at + sum(c)])))
        at += sum(c)
    if at != flat.numel():
        raise ValueError(f"the log holds {flat.numel()} coefficients, its counts say {at}")
    return entries


def encode_coded(coded: Coded) -> dict:
    """The records of a Ferret reply."""
    return {"ferret": ConfigRecord({"seed": coded.seed, "counts": list(coded.counts)}),
            "coeffs": ArrayRecord([coded.coeffs.numpy()])}


def decode_coded(content) -> Coded:
    conf = content["ferret"]
    return Coded(int(conf["seed"]), tuple(int(c) for c in conf["counts"]), _one_array(content["coeffs"]))


def _one_array(record: ArrayRecord) -> torch.Tensor:
    (array,) = record.to_numpy_ndarrays()
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: Flower's buffers are read-only


def weights_record(named: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().to("cpu", torch.float32).contiguous() for k, v in named.items()})


def weights_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) for k, v in record.items()}
