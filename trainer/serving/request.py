"""A generation request as the engine tracks it, and the events it sends back to the HTTP layer.

The HTTP layer builds a `GenRequest` (prompt tokens, the served model id, sampling parameters,
and a `sink` that takes events from the engine thread); everything below `sink` is engine state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from trainer.serving.sampling import SamplingParams
from trainer.serving.text import TextStream


@dataclass
class Token:
    """One generated token; `text` is what became final with it (may be empty)."""
    text: str
    version: str


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    version: str


@dataclass
class Failed:
    status: int  # HTTP status to report (503 when shutting down, 500 on an engine error)
    message: str
    code: str | None = None


Event = Token | Finished | Failed


@dataclass(eq=False)  # identity: the engine keeps requests in sets and lists
class GenRequest:
    id: str
    model: str  # served model id (base, adapter, or ft:...)
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]

    # ---- engine state ----
    arrival: float = 0.0
    started: float | None = None  # admitted to a slot (queue time ends)
    adapter: str = ""  # peft adapter pinned at admission
    version: str = ""  # version label pinned at admission
    cache: object | None = None  # the request's own KV cache while its prompt is prefilled
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[float] = field(default_factory=list)  # inter-token latencies
    finish_reason: str | None = None
    done: bool = False

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - self.prefilled
