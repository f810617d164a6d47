"""The `serving:` config section (`python train.py serve --config ... serving.port=8000`).

The fine-tuning job of a served config is described by the trainer's own sections (`model`,
`data`, `adapter`, `optim`, `train`); this section holds only what serving adds.
"""
from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

# what a served model id may look like (also the ids of fine-tuned models, ft:<base>:<job>)
MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.:/@-]*$")


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="address to bind; 127.0.0.1 keeps the server local")
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (printed at start-up)")
    api_key: Optional[str] = Field(None, description="when set, requests need 'Authorization: Bearer <key>'")
    model_name: Optional[str] = Field(None, description="id of the base model in the API; default: from model.name_or_path")
    adapters: dict[str, str] = Field(default_factory=dict, description="served name -> peft LoRA adapter folder")
    tpot_slo_ms: float = Field(200.0, gt=0, description="per-output-token latency target the scheduler holds")
    slo_margin: float = Field(0.1, ge=0, lt=1, description="iterations are planned to (1 - margin) x the target")
    max_running: int = Field(16, ge=1, description="requests decoding at once (rows of the decode batch)")
    max_waiting: int = Field(256, ge=1, description="queued requests beyond which new ones get 503")
    max_batch_tokens: int = Field(512, ge=8, description="tokens of one iteration: decode rows + prefill + fine-tuning")
    prefill_chunk: int = Field(256, ge=1, description="most prompt tokens of one request per iteration (chunked prefill)")
    max_model_len: Optional[int] = Field(None, ge=8, description="prompt + completion tokens; default min(model positions, 4096)")
    default_max_tokens: int = Field(256, ge=1, description="completion length when a chat request gives no max_tokens")
    finetune: bool = Field(False, description="train the config's own job (model/data/adapter/optim/train) while serving")
    publish_every: int = Field(10, ge=1, description="optimizer steps between adapter versions published to serving")
    ft_chunk_tokens: int = Field(1024, ge=1, description="most tokens (rows x positions) of one fine-tuning forward chunk")
    ft_group_tokens: Optional[int] = Field(256, ge=1, description="a micro-batch goes through the engine in groups "
                                           "of whole rows (by length) of at most this many real tokens, each group "
                                           "forwarded whole when its time allows (the training loop's own padding-free "
                                           "loss); a whole micro-batch of 4 chat rows takes ~1.6 s forward on 2 CPU "
                                           "cores, more than an idle iteration (null: whole micro-batches; raise it on "
                                           "a GPU)")
    ft_min_chunk: int = Field(128, ge=1, description="fewest tokens (rows x positions) of a forward chunk, unless the "
                              "sequences end: a model call has a fixed cost (~0.1 s for a 135M model on 2 CPU cores), "
                              "so smaller chunks spend most of their time on it")
    tpot_window: int = Field(8, ge=1, description="decode iterations may bank the budget they leave unused for one "
                             "later fine-tuning unit, up to (tpot_window - 1) iterations' budget: over any n decode "
                             "iterations the time stays within n x budget + that bank (1: each iteration within its "
                             "own budget)")
    ft_idle_budget_ms: float = Field(1000.0, gt=0, description="fine-tuning time per iteration when no request is in "
                                     "the engine: a request that arrives then waits up to about this long for the "
                                     "unit in progress (larger units train faster on a CPU)")
    ft_max_wait_iters: int = Field(0, ge=0, description="after this many iterations without fine-tuning work, run one "
                                   "unit anyway, over the TPOT target (guarantees progress under overload; 0: never, "
                                   "the target always comes first)")
    jobs_dir: str = Field("runs/serve-jobs", description="where jobs submitted over HTTP keep their runs and records")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="how long in-flight requests may finish at shutdown")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads; default: torch's")
    iteration_log: Optional[str] = Field(None, description="JSONL file: one line per engine iteration (plan, timing, cost model)")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not MODEL_ID.match(name) or name.startswith("ft:"):
                raise ValueError(f"adapter name {name!r} must be letters, digits and . _ - : / @, not starting "
                                 f"with 'ft:' (reserved for fine-tuned models)")
        return value

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not MODEL_ID.match(value) or value.startswith("ft:")):
            raise ValueError(f"model_name {value!r} must be letters, digits and . _ - : / @, not starting with 'ft:'")
        return value
