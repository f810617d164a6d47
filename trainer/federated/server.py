"""The server: prepare (every check, before any client starts), then the rounds.

`prepare` validates the settings, the run directory and the data and model (empty clients, K
against the blocks), builds the server's copy of the model (the trainer's `build_job`) and loads
the last finished round on `train.resume=auto`. `serve` runs on Flower's `Grid` (simulation or
deployment alike): it asks the nodes which client they are, then per round sends, aggregates
(through the strategy), evaluates the global weights on the held-out set, logs one row to
metrics.jsonl (and W&B) and checkpoints, and at the end writes the adapter or model like `train.py`.
"""
from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from trainer.config import Config, save_config
from trainer.errors import UserError
from trainer.evaluate import evaluate
from trainer.export import save_final
from trainer.federated.checkpoint import load_round, save_round
from trainer.federated.config import check_config
from trainer.federated.setup import Parts, build_parts
from trainer.federated.strategy import FedAvgStrategy, FerretStrategy, GlobalState
from trainer.rundir import plan_run_dir
from trainer.tracking import Tracker

# federated keys a resumed run may change; every other one must match the run it continues
RESUMABLE_KEYS = {"rounds", "stop_after_rounds", "round_timeout", "connect_timeout", "client_cpus", "client_gpus",
                  "simulate_failures", "min_replies"}


@dataclass
class Server:
    cfg: Config
    parts: Parts
    state: GlobalState
    run_dir: Path
    resumed: bool
    wandb_id: str | None = None
    finished: bool = False


def prepare(cfg: Config) -> Server:
    check_config(cfg)
    resume_from = plan_run_dir(cfg)
    run_dir = Path(cfg.train.output_dir)
    if resume_from is not None:
        _check_resume(cfg, run_dir)
    parts = build_parts(cfg)
    state = GlobalState(parts.travel, parts.theta0.clone(), parts.blocks)
    server = Server(cfg, parts, state, run_dir, resumed=resume_from is not None)
    if resume_from is not None:
        server.wandb_id = load_round(resume_from, state)
        if state.round >= cfg.federated.rounds:
            raise UserError(f"the run already finished round {state.round} of federated.rounds={cfg.federated.rounds}",
                            where=f"train.output_dir={run_dir}", hint="raise federated.rounds to continue it")
    return server


def _check_resume(cfg: Config, run_dir: Path) -> None:
    old = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("federated", {})
    new = cfg.federated.model_dump(mode="json")
    for key in sorted(set(new) - RESUMABLE_KEYS):
        if old.get(key) != new[key]:
            raise UserError(f"cannot resume with a different config: federated.{key} was {old.get(key)!r}, now {new[key]!r}",
                            where=str(run_dir / "config.yaml"))


def discover(grid: Grid, fed) -> dict[int, int]:
    """Client id -> node id: wait for num_clients nodes, then ask each which client it is."""
    deadline = time.monotonic() + fed.connect_timeout
    while len(nodes := list(grid.get_node_ids())) < fed.num_clients:
        if time.monotonic() > deadline:
            raise UserError(f"{len(nodes)} of federated.num_clients={fed.num_clients} nodes connected within "
                            f"{fed.connect_timeout:g} s", where="federated.num_clients",
                            hint="start one SuperNode per client with --node-config 'partition-id=I num-partitions=N'")
        time.sleep(1)
    asks = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(asks, timeout=fed.connect_timeout):
        if reply.has_error():
            raise UserError(f"node {reply.metadata.src_node_id} cannot join: {reply.error.reason}", where="federated")
        client = int(reply.content["node"]["client"])
        if client in found:
            raise UserError(f"two nodes claim client {client}", where="--node-config partition-id")
        found[client] = reply.metadata.src_node_id
    missing = sorted(set(range(fed.num_clients)) - set(found))
    if missing:
        raise UserError(f"no node answered as client {missing[0]} ({len(missing)} missing)", where="federated.num_clients")
    return found


def serve(grid: Grid, server: Server) -> None:
    cfg, parts, state = server.cfg, server.parts, server.state
    fed, t, run_dir, job = cfg.federated, cfg.train, server.run_dir, parts.job
    accelerator = parts.accelerator
    if not server.resumed:
        if t.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # resume=auto before any round finished: start over
    save_config(cfg, run_dir / "config.yaml")
    bar_cfg = cfg.model_copy(update={"train": t.model_copy(update={"max_steps": fed.rounds})})
    tracker = Tracker(accelerator, run_dir, bar_cfg, state.round, server.wandb_id)
    tracker.write(f"federated {fed.strategy}: {fed.num_clients} clients ({fed.partition}, sizes "
                  f"{[len(p) for p in parts.partitions]}), {fed.per_round} per round, {fed.rounds} rounds of "
                  f"{fed.local_steps} local steps; {state.travel.dim:,} values travel in {len(state.blocks)} blocks"
                  + (f"; resuming after round {state.round}" if server.resumed else ""))

    nodes = discover(grid, fed)
    strategy = (FerretStrategy if fed.strategy == "ferret" else FedAvgStrategy)(cfg, state, nodes)
    strategy.summary()

    def held_out() -> dict[str, float]:
        if not job.eval_set:
            return {}
        state.travel.load(job.trainable_model, state.theta)
        return evaluate(accelerator, job.model, job.eval_set, job.task, t.batch_size, t.eval_batches)

    if state.round == 0:
        tracker.log(0, {"round": 0, **held_out()})
    while state.round < fed.rounds:
        rnd = state.round + 1
        began = time.perf_counter()
        arrays = state.arrays() if fed.strategy != "ferret" else ArrayRecord()
        messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        strategy.aggregate_train(rnd, replies)
        state.round = rnd  # also after a round left unchanged: it happened, and is not re-run
        trained = time.perf_counter()
        metrics = held_out()
        tracker.log(rnd, {**_row(strategy.report), **metrics, "round_s": trained - began,
                          "eval_s": time.perf_counter() - trained})
        tracker.advance()
        save_round(run_dir, state, tracker.wandb_id, t.keep_last)
        if rnd == fed.stop_after_rounds:
            tracker.write(f"stopped after round {rnd}; continue with train.resume=auto")
            tracker.close()
            server.finished = True
            return
    state.travel.load(job.trainable_model, state.theta)
    if metrics:
        tracker.write("final " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    save_final(accelerator, job.model, job.tokenizer, cfg, run_dir)
    tracker.close()
    server.finished = True


def _row(report: dict) -> dict:
    """One round's metrics: totals and per client (bytes as serialized, losses, compute times)."""
    clients = report["clients"]
    trained = {c: v for c, v in clients.items() if "train-loss" in v}
    row = {"round": report["round"], "clients": len(report["sampled"]), "aggregated": report.get("aggregated", 0),
           "failures": len(report["failed"]),
           "bytes_down": sum(v.get("bytes_down", 0) for v in clients.values()),
           "bytes_up": sum(v.get("bytes_up", 0) for v in clients.values())}
    down = [v["bytes_down"] for v in clients.values() if "bytes_down" in v]
    up = [v["bytes_up"] for c, v in clients.items() if c in trained]
    row.update({"bytes_down_per_client": statistics.fmean(down) if down else 0.0,
                "bytes_up_per_client": statistics.fmean(up) if up else 0.0})
    if trained:
        row["train/loss"] = statistics.fmean(v["train-loss"] for v in trained.values())
        for key in ("train-s", "sync-s", "project-s"):
            values = [v[key] for v in trained.values() if key in v]
            if values:
                row[f"client_{key.replace('-', '_')}"] = statistics.fmean(values)
    if "aggregate_s" in report:
        row["aggregate_s"] = report["aggregate_s"]
    if report["failed"]:
        row["failed_clients"] = ",".join(str(c) for c in sorted(report["failed"]))
    for c, v in sorted(clients.items()):
        for key in ("train-loss", "bytes_up", "bytes_down"):
            if key in v:
                row[f"client/{c}/{key.replace('-', '_')}"] = v[key]
    return row
