"""What the API serves: the base model, user adapters, and fine-tuned models with versions.

The HTTP thread reads it (model list, id lookup) while the engine thread changes it, so its
tables sit behind a lock; the model itself is only touched by the engine thread (`publish`).

A fine-tuned model (`ft:<base>:<job>`) is a set of frozen adapter slots. Publishing copies the
trainee's weights into a slot no running request uses, and makes it the current version; a
request pins the slot current when it starts and keeps it to its end, so a version that is
replaced mid-request stays intact until its last request finishes (then its slot is reused).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from trainer.serving import lora


@dataclass
class Served:
    id: str
    kind: str  # "base" | "adapter" | "finetune"
    created: int
    adapter: str  # peft adapter name of the current version (lora.BASE for the base model)
    parent: str | None = None
    version: int = 0  # fine-tuned models: 1, 2, ... per publish
    step: int | None = None  # optimizer step of the current version
    job: str | None = None
    slots: list[str] = field(default_factory=list)
    published_at: float | None = None

    def card(self) -> dict:
        """The OpenAI model object, with vLLM's `parent`/`root` and our version fields."""
        out = {"id": self.id, "object": "model", "created": self.created, "owned_by": "peftforge",
               "root": self.parent or self.id, "parent": self.parent}
        if self.kind == "finetune":
            out.update(version=self.version, step=self.step, job=self.job)
        return out


class Registry:
    def __init__(self, base_id: str):
        self.base_id = base_id
        self._lock = threading.Lock()
        self._models: dict[str, Served] = {base_id: Served(base_id, "base", int(time.time()), lora.BASE)}
        self._pins: dict[str, int] = {}  # adapter slot -> running requests
        self._slot_counter = 0

    # ---- any thread ---------------------------------------------------------------------
    def get(self, model_id: str) -> Served | None:
        with self._lock:
            return self._models.get(model_id)

    def cards(self) -> list[dict]:
        with self._lock:
            return [m.card() for m in self._models.values()]

    def finetuned_id(self, name: str) -> str:
        return f"ft:{self.base_id}:{name}"

    # ---- engine thread ------------------------------------------------------------------
    def add_adapter(self, model_id: str, adapter: str) -> None:
        with self._lock:
            self._models[model_id] = Served(model_id, "adapter", int(time.time()), adapter, parent=self.base_id)

    def pin(self, model_id: str) -> tuple[str, str]:
        """(adapter name, version label) a new request keeps to its end."""
        with self._lock:
            served = self._models[model_id]
            self._pins[served.adapter] = self._pins.get(served.adapter, 0) + 1
            label = f"{model_id}@v{served.version}" if served.kind == "finetune" else model_id
            return served.adapter, label

    def unpin(self, adapter: str) -> None:
        with self._lock:
            self._pins[adapter] -= 1

    def publish(self, model, model_id: str, job: str, step: int, version: int, source: str = lora.TRAINEE) -> None:
        """Copy `source`'s weights into a free slot of `model_id` and serve them as `version`."""
        with self._lock:
            served = self._models.get(model_id)
            free = [s for s in served.slots if s != served.adapter and not self._pins.get(s)] if served else []
        if free:
            slot = free[0]
        else:  # every slot is current or pinned: a new one (at most one per request in flight)
            self._slot_counter += 1
            slot = f"ft_slot_{self._slot_counter}"
            lora.add_slot(model, slot)
        lora.copy_adapter(model, source, slot)
        with self._lock:
            if served is None:
                served = self._models[model_id] = Served(model_id, "finetune", int(time.time()), slot,
                                                         parent=self.base_id, job=job)
            if slot not in served.slots:
                served.slots.append(slot)
            served.adapter, served.version, served.step = slot, version, step
            served.published_at = time.time()

    def serve_saved(self, model_id: str, adapter: str, job: str, version: int, step: int | None) -> None:
        """A fine-tuned model loaded from its saved adapter (a finished job, after a restart)."""
        with self._lock:
            self._models[model_id] = Served(model_id, "finetune", int(time.time()), adapter, parent=self.base_id,
                                            version=version, step=step, job=job, slots=[adapter])

    def staleness(self, model_id: str, trainee_step: int) -> int | None:
        with self._lock:
            served = self._models.get(model_id)
            return None if served is None or served.step is None else trainee_step - served.step
