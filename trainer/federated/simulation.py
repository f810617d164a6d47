"""`train.py federated`: every client a virtual SuperNode in Flower's simulation engine (Ray).

Everything is checked and the server's model built before Ray starts; Ray gives each client
`federated.client_cpus` CPUs (and `client_gpus` GPUs), so on 2 cores with 1 CPU each two clients
train at once. Ray actors are reused across virtual clients, and each builds the model once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from trainer.config import Config
from trainer.errors import UserError


def run(cfg: Config) -> Path:
    from trainer.federated.server import prepare

    fed = cfg.federated
    cpus = os.cpu_count() or 1
    if fed.client_cpus > cpus:
        raise UserError(f"federated.client_cpus={fed.client_cpus:g} is more than this machine's {cpus} CPUs, so no "
                        f"client could start", where="federated.client_cpus", hint=f"use at most {cpus}")
    if fed.client_gpus > 0 and not torch.cuda.is_available():
        raise UserError("federated.client_gpus is set but no GPU is visible", where="federated.client_gpus")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("train.py federated runs as one process; its clients are Ray actors, not launcher processes",
                        where="accelerate launch", hint="run it with plain python")
    server = prepare(cfg)

    from flwr.simulation import run_simulation

    from trainer.federated.apps import make_client_app, make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-message INFO lines; ours are in metrics.jsonl
    run_simulation(
        server_app=make_server_app(server), client_app=make_client_app(cfg), num_supernodes=fed.num_clients,
        backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus},
                        "init_args": {"include_dashboard": False, "num_cpus": cpus, "log_to_driver": True}},
    )
    if not server.finished:
        raise RuntimeError("the federated server stopped before its last round (see the log above)")
    return server.run_dir
