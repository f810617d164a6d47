"""What the server and every client build the same way from one config: the data, the clients'
partitions, the model with its adapter (the trainer's own `build_job`), the parameters that
travel and Ferret's blocks over them.

Every side seeds identically before building, so all start from the same initial weights
(a tiny model's random ones, an adapter's seeded initialisation) without sending them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed

from trainer.config import Config
from trainer.distributed import make_accelerator
from trainer.errors import UserError
from trainer.federated.ferret import Block, make_blocks
from trainer.federated.params import Travel
from trainer.federated.partition import partition
from trainer.job import Job, build_job, load_data
from trainer.models import load_tokenizer

# scaling=exact builds and orthonormalises a d_l x d_l basis per block (QR, d_l^3)
EXACT_MAX_BLOCK = 4096


def job_config(cfg: Config) -> Config:
    """The trainer config the clients' steps run under: the LR schedule (warm-up, decay) spans
    the whole federated run, rounds x local_steps optimizer steps."""
    steps = cfg.federated.rounds * cfg.federated.local_steps
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})


@dataclass
class Parts:
    cfg: Config
    accelerator: Any
    job: Job
    partitions: list[list[dict]]  # each client's training examples
    travel: Travel
    theta0: torch.Tensor  # the initial travelling weights, flat fp32
    blocks: list[Block]


def build_parts(cfg: Config) -> Parts:
    fed, seed = cfg.federated, cfg.train.seed
    accelerator = make_accelerator(cfg)
    set_seed(seed)
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set = load_data(cfg, tokenizer)
    indices = partition(train_set, fed.partition, fed.num_clients, seed, fed.alpha, min_size=cfg.train.batch_size)
    set_seed(seed)  # the initial weights must not depend on what loading the data drew
    job = build_job(job_config(cfg), accelerator, tokenizer=tokenizer, data=(train_set, eval_set))
    model = job.trainable_model
    travel = Travel.of(model)
    blocks = make_blocks(travel.numels, fed.block_size)
    check_blocks(cfg, blocks, travel.dim)
    return Parts(cfg, accelerator, job, [[train_set[i] for i in idx] for idx in indices], travel,
                 travel.flat(model), blocks)


def check_blocks(cfg: Config, blocks: list[Block], dim: int) -> None:
    """Ferret settings that the number of travelling values and blocks rule out."""
    fed = cfg.federated
    if fed.strategy != "ferret":
        return
    if fed.scaling == "exact":
        if max(b.size for b in blocks) > EXACT_MAX_BLOCK:
            raise UserError(f"federated.scaling=exact builds a full orthonormal basis per block, and blocks of up to "
                            f"{max(b.size for b in blocks)} values are too large for that", where="federated.block_size",
                            hint=f"set federated.block_size <= {EXACT_MAX_BLOCK}")
        return
    if fed.num_bases > dim:
        raise UserError(f"federated.num_bases={fed.num_bases} is more than the {dim} values that travel, so bases "
                        f"would outnumber dimensions", where="federated.num_bases",
                        hint=f"use at most {dim}, or federated.strategy=fedavg to send the weights themselves")
    if fed.num_bases < fed.min_bases_per_block * len(blocks):
        raise UserError(f"federated.num_bases={fed.num_bases} cannot give each of the {len(blocks)} blocks "
                        f"(federated.block_size={fed.block_size}) federated.min_bases_per_block="
                        f"{fed.min_bases_per_block}", where="federated.num_bases",
                        hint=f"raise num_bases to {fed.min_bases_per_block * len(blocks)} or more, or block_size")
