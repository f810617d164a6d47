"""The `federated:` config section (read by `train.py federated`; ignored by plain training).

Checks that need only the config live here, in the schema; the ones that need the adapter
registry live in `check_config`, and the ones that need the data or the model (empty clients,
K against the blocks) run on the server before any client starts.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.errors import UserError


class FederatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_clients: int = Field(4, ge=1, description="clients (simulated SuperNodes; in deployment, the SuperNodes' num-partitions)")
    rounds: int = Field(3, ge=1)
    clients_per_round: Union[int, float] = Field(1.0, gt=0, description="a count (integer) or a fraction (0, 1] of num_clients")
    local_steps: int = Field(5, ge=1, description="optimizer steps of train.batch_size x gradient_accumulation_steps per client and round")
    partition: Literal["iid", "dirichlet", "by_source"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    strategy: Literal["ferret", "fedavg", "fedit"] = "ferret"
    server_lr: float = Field(1.0, gt=0, description="global step: w -= server_lr * weighted mean of the client updates")
    num_bases: int = Field(1024, ge=1, description="Ferret's K: coefficients each client sends per round")
    block_size: int = Field(65536, ge=1, description="Ferret: largest block; bigger tensors are cut, smaller ones packed")
    min_bases_per_block: int = Field(1, ge=1, description="Ferret: floor of K_l")
    scaling: Literal["unbiased", "code", "exact"] = Field(
        "unbiased", description="Ferret's coefficient scale: unbiased (1/(rho K_l)), code (the official code's d_l/K_l), "
        "exact (a full orthonormal basis per block: reproduces FedAvg, as many floats as FedAvg; for verification)")
    min_replies: int = Field(1, ge=1, description="fewer replies than this leave the global model unchanged for the round")
    round_timeout: float = Field(3600.0, gt=0, description="seconds the server waits for a round's replies")
    connect_timeout: float = Field(600.0, gt=0, description="seconds the server waits for num_clients nodes to connect")
    client_cpus: float = Field(1.0, gt=0, description="simulation: CPUs reserved per client (Ray actor)")
    client_gpus: float = Field(0.0, ge=0, description="simulation: GPUs (fraction) per client")
    stop_after_rounds: Optional[int] = Field(None, ge=1, description="stop resumably after this round")
    simulate_failures: dict[int, list[int]] = Field(
        default_factory=dict, description="round -> client ids that raise after training in that round (fault drills)")

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedConfig":
        per_round = self.clients_per_round
        if isinstance(per_round, float) and per_round > 1:
            raise ValueError(f"clients_per_round={per_round} is a fraction above 1; write an integer for a count")
        if isinstance(per_round, int) and per_round > self.num_clients:
            raise ValueError(f"clients_per_round={per_round} is more than num_clients={self.num_clients}")
        if self.min_replies > self.per_round:
            raise ValueError(f"min_replies={self.min_replies} is more than the {self.per_round} clients sampled per round")
        for rnd, ids in self.simulate_failures.items():
            bad = [i for i in ids if not 0 <= i < self.num_clients]
            if bad or not 1 <= rnd:
                raise ValueError(f"simulate_failures {{{rnd}: {ids}}} names a round below 1 or a client outside "
                                 f"0..{self.num_clients - 1}")
        return self

    @property
    def per_round(self) -> int:
        """Clients sampled per round."""
        c = self.clients_per_round
        return c if isinstance(c, int) else max(1, math.floor(c * self.num_clients + 1e-9))


def check_config(cfg) -> None:
    """Settings that no federated run can use, refused before anything loads."""
    import adapters

    fed, method = cfg.federated, adapters.ADAPTERS[cfg.adapter.type]
    if method.adds_parameters:
        raise UserError(f"adapter.type={cfg.adapter.type} changes the shape of its parameters during training, so "
                        f"clients' updates cannot be aggregated (Ferret's bases and FedAvg's mean need one fixed "
                        f"parameter set)", where="adapter.type", hint="use lora, dora, adalora or none")
    if fed.strategy == "fedit" and method.kind == "full":
        raise UserError("federated.strategy=fedit averages adapter parameters, and adapter.type=none has none",
                        where="federated.strategy", hint="set adapter.type=lora, or federated.strategy=fedavg for the full model")
    if fed.stop_after_rounds is not None and fed.stop_after_rounds >= fed.rounds:
        raise UserError(f"federated.stop_after_rounds={fed.stop_after_rounds} is not before the last round "
                        f"({fed.rounds})", where="federated.stop_after_rounds")
