"""The server's side of a round, as Flower strategies: who trains, what they are sent, and how
their replies become the next global weights.

- `FedAvgStrategy` (`fedavg`, and `fedit`, which is the same over LoRA parameters) is Flower's own
  `FedAvg`: its reply checks and its weighted mean of the clients' weights (by `num-examples`),
  then w <- w + server_lr * (mean - w).
- `FerretStrategy` receives seeds and coefficients, scales each client's by server_lr and its
  weight, and applies them (w -= sum_i V_i^T gamma_i); it keeps them in a log, which is what it
  sends nodes instead of weights.

Both sample the round's clients from (train.seed, round), not from Flower's node ids (new in
every simulation), so a resumed run trains the same clients, and both sort replies by client
before aggregating, so the sum runs in one order. A client that raises, or does not answer
within `federated.round_timeout`, is left out of the round and reported; with fewer than
`federated.min_replies` replies the global weights stay as they were.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from trainer.federated import wire
from trainer.federated.ferret import Block, Coded, apply_coded, derive_seed
from trainer.federated.params import Travel

log = logging.getLogger(__name__)


def sample_clients(num_clients: int, count: int, seed: int, rnd: int) -> list[int]:
    g = torch.Generator().manual_seed(derive_seed("sample", seed, rnd))
    return sorted(torch.randperm(num_clients, generator=g)[:count].tolist())


class GlobalState:
    """The global weights (flat fp32), Ferret's log, and the last finished round."""

    def __init__(self, travel: Travel, theta: torch.Tensor, blocks: list[Block], round_: int = 0,
                 log_: list[wire.LogEntry] | None = None):
        self.travel, self.theta, self.blocks, self.round = travel, theta, blocks, round_
        self.log: list[wire.LogEntry] = log_ or []

    def arrays(self) -> ArrayRecord:
        return wire.weights_record(self.travel.tensors(self.theta))


class _Rounds:
    """Sampling, messages, byte counts and reply triage, shared by both strategies."""

    def _setup(self, cfg, state: GlobalState, nodes: dict[int, int]) -> None:
        self.cfg, self.fed, self.state = cfg, cfg.federated, state
        self.nodes = nodes  # client id -> node id
        self.client_of = {node: client for client, node in nodes.items()}
        self.report: dict = {}

    def sampled(self, rnd: int) -> list[int]:
        return sample_clients(self.fed.num_clients, self.fed.per_round, self.cfg.train.seed, rnd)

    def _message(self, client: int, content: RecordDict, rnd: int) -> Message:
        msg = Message(content=content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN, group_id=str(rnd))
        self.report["clients"].setdefault(client, {})["bytes_down"] = wire.wire_bytes(msg)
        return msg

    def _start(self, rnd: int) -> list[int]:
        clients = self.sampled(rnd)
        self.report = {"round": rnd, "sampled": clients, "clients": {}, "failed": {}}
        return clients

    def _triage(self, replies: Iterable[Message]) -> list[tuple[int, Message]]:
        """Replies with content, sorted by client; failures go to the report."""
        valid, seen = [], set()
        for msg in replies:
            client = self.client_of.get(msg.metadata.src_node_id)
            if client is None:
                continue
            seen.add(client)
            self.report["clients"].setdefault(client, {})["bytes_up"] = wire.wire_bytes(msg)
            reason = msg.error.reason if msg.has_error() else self._invalid(client, msg)
            if reason:
                self.report["failed"][client] = reason
            else:
                valid.append((client, msg))
        for client in self.report["sampled"]:
            if client not in seen:
                self.report["failed"][client] = f"no reply within {self.fed.round_timeout:g} s"
        for client, reason in sorted(self.report["failed"].items()):
            log.warning("round %d: client %d failed: %s", self.report["round"], client, reason)
        for client, msg in valid:
            m = msg.content["metrics"]
            self.report["clients"][client].update({k: float(m[k]) for k in ("train-loss", "train-s", "sync-s", "project-s") if k in m})
        return sorted(valid, key=lambda cm: cm[0])

    def _invalid(self, client: int, msg: Message) -> str | None:
        """Why a reply cannot be aggregated (it then fails its client, not the round), or None."""
        metrics = msg.content.get("metrics")
        if metrics is None or not int(metrics.get("num-examples", 0)) > 0:
            return "reply without num-examples"
        return None

    def _enough(self, valid: list) -> bool:
        self.report["aggregated"] = len(valid) if len(valid) >= self.fed.min_replies else 0
        if not self.report["aggregated"]:
            log.warning("round %d: %d replies, fewer than federated.min_replies=%d: the global weights stay as they were",
                        self.report["round"], len(valid), self.fed.min_replies)
        return bool(self.report["aggregated"])

    @staticmethod
    def _weights(valid: list[tuple[int, Message]]) -> list[float]:
        sizes = [float(msg.content["metrics"]["num-examples"]) for _, msg in valid]
        return [s / sum(sizes) for s in sizes]

    def _finish(self, began: float) -> tuple[ArrayRecord, MetricRecord]:
        self.report["aggregate_s"] = time.perf_counter() - began
        return self.state.arrays(), MetricRecord({"aggregated": self.report["aggregated"]})

    # evaluation is centralised (the server's held-out set), so nodes get no evaluate messages
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None


class FedAvgStrategy(_Rounds, FedAvg):
    def __init__(self, cfg, state: GlobalState, nodes: dict[int, int]):
        FedAvg.__init__(self, min_train_nodes=1, min_available_nodes=1, weighted_by_key="num-examples")
        self._setup(cfg, state, nodes)

    def summary(self) -> None:
        log.info("FedAvg over %d values, server_lr %g", self.state.travel.dim, self.fed.server_lr)

    def _invalid(self, client: int, msg: Message) -> str | None:
        if "arrays" not in msg.content:
            return "reply without weights"
        try:
            weights = self.state.travel.from_tensors(wire.weights_of(msg.content["arrays"]))
        except ValueError as e:
            return f"sent other weights: {e}"
        if not torch.isfinite(weights).all():
            return "sent non-finite weights"
        return super()._invalid(client, msg)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return [self._message(c, RecordDict({"arrays": arrays, "config": ConfigRecord({"round": server_round})}), server_round)
                for c in self._start(server_round)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._triage(replies)
        if not self._enough(valid):
            return None, MetricRecord({"aggregated": 0})
        began = time.perf_counter()
        mean, _ = FedAvg.aggregate_train(self, server_round, [msg for _, msg in valid])
        mean = self.state.travel.from_tensors(wire.weights_of(mean))
        lr = self.fed.server_lr
        # lr 1 is plain FedAvg: take Flower's mean as it is, not w + (mean - w) with its rounding
        self.state.theta = mean if lr == 1 else self.state.theta + lr * (mean - self.state.theta)
        return self._finish(began)


class FerretStrategy(_Rounds, Strategy):
    def __init__(self, cfg, state: GlobalState, nodes: dict[int, int]):
        self._setup(cfg, state, nodes)
        self.synced: dict[int, int] = {}  # node id -> the round whose global weights it holds

    def summary(self) -> None:
        log.info("Ferret over %d values in %d blocks, K=%d, server_lr %g", self.state.travel.dim,
                 len(self.state.blocks), self.fed.num_bases, self.fed.server_lr)

    def client_seed(self, rnd: int, client: int) -> int:
        return derive_seed("bases", self.cfg.train.seed, rnd, client)

    def _invalid(self, client: int, msg: Message) -> str | None:
        blocks, rnd = self.state.blocks, self.report["round"]
        try:
            c = wire.decode_coded(msg.content)
        except (KeyError, ValueError) as e:
            return f"reply without seed and coefficients ({e})"
        if c.seed != self.client_seed(rnd, client):
            return f"answered with seed {c.seed}, not the round's"
        if len(c.counts) != len(blocks) or sum(c.counts) != c.coeffs.numel() or \
                any(not 0 <= k <= b.size for k, b in zip(c.counts, blocks)):
            return f"sent {len(c.counts)} block counts and {c.coeffs.numel()} coefficients for {len(blocks)} blocks"
        if not torch.isfinite(c.coeffs).all():
            return "sent non-finite coefficients"
        return super()._invalid(client, msg)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        sqnorm = float(self.state.theta.double().square().sum())
        messages = []
        for client in self._start(server_round):
            held = self.synced.get(self.nodes[client], 0)
            fields, coeffs = wire.encode_log([e for e in self.state.log if e.round > held])
            conf = ConfigRecord({"round": server_round, "seed": self.client_seed(server_round, client), "from-round": held,
                                 "target-round": server_round - 1, "target-sqnorm": sqnorm, **fields})
            content = RecordDict({"config": conf, **({"log": coeffs} if coeffs is not None else {})})
            messages.append(self._message(client, content, server_round))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._triage(replies)
        for client in self.report["failed"]:
            self.synced.pop(self.nodes[client], None)  # unknown now: next time it gets the whole log
        if not self._enough(valid):
            return None, MetricRecord({"aggregated": 0})
        began = time.perf_counter()
        entries = []
        for (client, msg), weight in zip(valid, self._weights(valid)):
            coded = wire.decode_coded(msg.content)
            scaled = (coded.coeffs * (self.fed.server_lr * weight)).to(torch.float32)
            entries.append(wire.LogEntry(server_round, client, Coded(coded.seed, coded.counts, scaled)))
            self.synced[self.nodes[client]] = server_round - 1
        apply_coded(self.state.theta, [e.coded for e in entries], self.state.blocks, self.fed.scaling == "exact")
        self.state.log.extend(entries)
        return self._finish(began)
