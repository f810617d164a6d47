"""The reference side of the engine tests: the server's own `serve` with the ClientApp's handlers
called directly in this process, one node per client, instead of through a Flower engine.

It has what `serve` uses of a Flower `Grid` (node ids; send and receive, where a handler that
raises becomes an error reply, as Flower makes it), so a run on Flower's simulation or deployment
engine can be compared with the same run delivered by hand."""
from __future__ import annotations

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from trainer.config import load_config
from trainer.federated.client import handle_query, handle_train
from trainer.federated.server import prepare, serve


class DirectDelivery:
    def __init__(self, cfg):
        n = cfg.federated.num_clients
        self.cfg = cfg
        self.contexts = {100 + c: Context(run_id=1, node_id=100 + c, node_config={"partition-id": c, "num-partitions": n},
                                          state=RecordDict(), run_config={}) for c in range(n)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            handler = handle_train if msg.metadata.message_type == MessageType.TRAIN else handle_query
            try:
                replies.append(handler(msg, context, self.cfg))
            except Exception as e:  # noqa: BLE001  (Flower turns a ClientApp exception into an error reply)
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies


def run_direct(config: str, overrides: list[str]) -> None:
    """`train.py federated --config CONFIG OVERRIDES`, the rounds delivered by hand, one thread
    (as a Ray actor with one CPU and a subprocess with OMP_NUM_THREADS=1 compute)."""
    saved_identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    threads = torch.get_num_threads()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    try:
        cfg = load_config(config, overrides)
        server = prepare(cfg)
        serve(DirectDelivery(cfg), server)
        assert server.finished
    finally:
        torch.set_num_threads(threads)
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved_identity
