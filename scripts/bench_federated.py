"""Ferret vs FedAvg / FedIT: bytes per client-round, client compute, server aggregation time as the
model grows (tiny -> SmolLM2-135M), and round wall time in Flower's simulation.

Per model (what travels: its trainable parameters) it builds the real messages with the code the
runs use (trainer.federated.wire) and counts their serialized bytes; it times, alternating Ferret
and the reference in every repeat, the client's extra work (Ferret's projection; FedAvg sends its
weights as they are) and the server's aggregation of `--clients` updates (Ferret: regenerate the
bases and reconstruct each client's update; FedAvg: Flower's weighted mean of the weights), and
the client's local steps themselves (the trainer's train_step). Then it runs `train.py federated`
on the tiny model with each strategy and reads the round wall times from metrics.jsonl.

    bash scripts/offline.sh .venv/bin/python scripts/bench_federated.py \
        --out runs/federated-bench.json

Prints a markdown table (medians in seconds, ratios Ferret / FedAvg; `--out` also keeps the JSON,
`--table JSON` prints the table of a kept result). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (name, config overrides): what travels grows from a tiny LoRA to the whole of SmolLM2-135M
MODELS = [
    ("tiny-lora", ["model.name_or_path=tiny:llama", "adapter.type=lora", "adapter.r=4"]),
    ("tiny-full", ["model.name_or_path=tiny:llama", "adapter.type=none"]),
    ("smollm2-lora-r8", ["adapter.type=lora", "adapter.r=8", "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]"]),
    ("smollm2-2-layers", ["adapter.type=none", r"adapter.trainable=['layers\.(28|29)\.']"]),
    ("smollm2-8-layers", ["adapter.type=none", r"adapter.trainable=['layers\.(2[2-9])\.']"]),
    ("smollm2-full", ["adapter.type=none"]),
]
BASE = ["model.name_or_path=packaged:smollm2-135m-instruct", "data.path=packaged:chatterbot_qa", "data.format=chat",
        "data.max_length=128", "train.batch_size=8", "optim.name=sgd", "optim.lr=0.01", "federated.partition=iid",
        "federated.num_clients=4"]


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def block_size_for(dim: int, num_bases: int, wanted: int) -> int:
    """`wanted`, or larger when the vector has more blocks than half the bases."""
    return max(wanted, -(-2 * dim // num_bases))


def bench_model(name: str, overrides: list[str], args) -> dict:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from trainer.config import load_config
    from trainer.federated import ferret, wire
    from trainer.federated.client import local_train
    from trainer.federated.setup import build_parts

    cfg = load_config(None, BASE + overrides + [f"federated.num_bases={args.num_bases}", "federated.block_size=1"])
    # blocks depend on the model: build once with a placeholder, then size them
    cfg.federated.strategy = "fedavg"
    parts = build_parts(cfg)
    dim = parts.travel.dim
    cfg.federated.block_size = block_size_for(dim, args.num_bases, args.block_size)
    blocks = ferret.make_blocks(parts.travel.numels, cfg.federated.block_size)
    n = args.clients
    torch.manual_seed(0)
    theta = parts.theta0
    deltas = [torch.randn(dim) * 1e-3 for _ in range(n)]
    metrics = MetricRecord({"num-examples": 100, "client": 0, "train-loss": 1.0, "sync-s": 0.1, "train-s": 1.0,
                            "project-s": 0.1})

    # --- bytes, on the messages the runs send ---------------------------------------------
    def msg(content):
        return Message(RecordDict(content), dst_node_id=1, message_type=MessageType.TRAIN)

    coded = [ferret.Coded(s, *ferret.project(d, blocks, s, args.num_bases)) for s, d in enumerate(deltas)]
    log = [wire.LogEntry(1, i, c) for i, c in enumerate(coded)]
    fields, coeffs = wire.encode_log(log)  # one round behind: the round's n updates
    conf = {"round": 2, "seed": 123, "from-round": 0, "target-round": 1, "target-sqnorm": 1.0}
    ferret_down = wire.wire_bytes(msg({"config": ConfigRecord({**conf, **fields}), "log": coeffs}))
    ferret_up = wire.wire_bytes(msg({**wire.encode_coded(coded[0]), "metrics": metrics}))
    weights = wire.weights_record(parts.travel.tensors(theta))
    fedavg_down = wire.wire_bytes(msg({"arrays": weights, "config": ConfigRecord({"round": 2})}))
    fedavg_up = wire.wire_bytes(msg({"arrays": weights, "metrics": metrics}))

    # --- timings, alternating Ferret and FedAvg in every repeat ---------------------------
    client_records = [RecordDict({"arrays": wire.weights_record(parts.travel.tensors(theta - d)),
                                  "metrics": MetricRecord({"num-examples": 100 + i})}) for i, d in enumerate(deltas)]
    project_s, ferret_agg_s, fedavg_agg_s = [], [], []
    for rep in range(args.repeats):
        order = ["ferret", "fedavg"] if rep % 2 == 0 else ["fedavg", "ferret"]
        for side in order:
            if side == "ferret":
                project_s.append(timed(lambda: ferret.project(deltas[0], blocks, rep, args.num_bases)))
                ferret_agg_s.append(timed(lambda: ferret.apply_coded(theta.clone(), coded, blocks)))
            else:
                fedavg_agg_s.append(timed(lambda: parts.travel.from_tensors(
                    wire.weights_of(aggregate_arrayrecords(client_records, "num-examples")))))
    steps = [timed(lambda: local_train(parts, parts.job.optimizer.state_dict(), 0, r + 1)) for r in range(args.step_repeats)]
    del parts
    med = statistics.median
    return {"model": name, "values": dim, "blocks": len(blocks), "block_size": cfg.federated.block_size,
            "num_bases": args.num_bases, "clients": n,
            "bytes": {"ferret_up": ferret_up, "ferret_down": ferret_down, "fedavg_up": fedavg_up, "fedavg_down": fedavg_down,
                      "ratio_up": ferret_up / fedavg_up, "ratio_total": (ferret_up + ferret_down) / (fedavg_up + fedavg_down)},
            "client_s": {"local_steps": med(steps), "local_steps_count": cfg.federated.local_steps,
                         "ferret_projection": med(project_s), "ratio": (med(steps) + med(project_s)) / med(steps)},
            "server_s": {"ferret_reconstruct": med(ferret_agg_s), "fedavg_mean": med(fedavg_agg_s),
                         "ratio": med(ferret_agg_s) / med(fedavg_agg_s)}}


def bench_simulation(args) -> dict:
    """Round wall time of `train.py federated` on the tiny model (Ray start-up excluded)."""
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for strategy in args.sim_order:
        run_dir = Path(args.scratch) / f"sim-{strategy}"
        cmd = [sys.executable, str(ROOT / "train.py"), "federated", "--config", str(ROOT / "configs" / "fed-tiny.yaml"),
               f"federated.strategy={strategy}", f"federated.rounds={args.sim_rounds}", f"train.output_dir={run_dir}",
               "train.overwrite=true"]
        began = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - began
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rounds = [r["round_s"] for r in rows if r.get("round", 0) > 0]
        out.setdefault(strategy, []).append({"round_s_median": statistics.median(rounds), "round_s": rounds,
                                             "eval_s_median": statistics.median(r["eval_s"] for r in rows if "eval_s" in r),
                                             "process_wall_s": wall})
    return out


def table(result: dict) -> str:
    """The markdown table of docs/results/federated.md: medians and Ferret / FedAvg ratios per model.
    FedIT is FedAvg over LoRA parameters, so on the LoRA rows its bytes and times are FedAvg's."""
    lines = ["| model | values sent | Ferret up / down (B) | FedAvg = FedIT on LoRA, up / down (B) | bytes ratio up+down "
             "| client: local steps (s) | + projection (s) | client ratio | server: Ferret reconstruct (s) "
             "| FedAvg mean (s) | server ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        b, c, v = m["bytes"], m["client_s"], m["server_s"]
        lines.append(f"| {m['model']} | {m['values']:,} | {b['ferret_up']:,} / {b['ferret_down']:,} | "
                     f"{b['fedavg_up']:,} / {b['fedavg_down']:,} | {b['ratio_total']:.2e} | {c['local_steps']:.3f} | "
                     f"{c['ferret_projection']:.3f} | {c['ratio']:.2f} | {v['ferret_reconstruct']:.3f} | "
                     f"{v['fedavg_mean']:.3f} | {v['ratio']:.1f} |")
    sim = result.get("simulation")
    if sim:
        lines += ["", "| strategy (tiny model, simulation) | round wall time, median over runs of the per-run medians (s) |",
                  "|---|---|"]
        for strategy, runs in sim.items():
            medians = [r["round_s_median"] for r in runs]
            lines.append(f"| {strategy} | {statistics.median(medians):.2f} ({', '.join(f'{x:.2f}' for x in medians)}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=[m for m, _ in MODELS])
    p.add_argument("--num-bases", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--clients", type=int, default=4, help="updates the server aggregates per round")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--step-repeats", type=int, default=2)
    p.add_argument("--sim-rounds", type=int, default=4)
    p.add_argument("--sim-order", nargs="*", default=["ferret", "fedavg", "fedit", "fedit", "fedavg", "ferret"])
    p.add_argument("--scratch", default="runs/bench-federated")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--table", metavar="JSON", help="print the table of a result written by --out (no measuring)")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what Flower's runtime sets
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"uptime_at_start": uptime, "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "models": []}
    for name, overrides in MODELS:
        if name in args.models:
            result["models"].append(bench_model(name, overrides, args))
            print(json.dumps(result["models"][-1]), flush=True)
    if args.sim_order:
        result["simulation"] = bench_simulation(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
