"""Fine-tuning jobs in the shape of OpenAI's API: create, list, get, cancel, events.

A job trains one LoRA adapter with the trainer's own code (`finetune.CoservedJob`) inside the
serving engine, one job at a time (as FlexLLM: one fine-tuning request per batch); others queue.
Its adapter is served as `ft:<base>:<suffix or job id>` from its first published version on.

Records live in `serving.jobs_dir` (`<id>.json`, events in `<id>.events.jsonl`; a job submitted over
HTTP also has its run directory `<id>/` there), so a restarted server serves the adapters of
finished jobs again and resumes unfinished ones from their last checkpoint (`train.resume=auto`).
The config's own job (`serving.finetune: true`) is one more record, with its run directory where
the config says (`train.output_dir`).
"""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trainer.config import Config, load_config
from trainer.errors import UserError
from trainer.serving import lora
from trainer.serving.finetune import CoservedJob, Prepared, prepare
from trainer.serving.protocol import APIError, JobCreate

log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled")
# what a job submitted over HTTP may set beyond the server's config
OVERRIDABLE = ("data.", "adapter.", "optim.", "train.")
FIXED = ("train.output_dir", "train.resume", "train.overwrite")


@dataclass
class JobRecord:
    id: str
    created_at: int
    model: str
    training_file: str
    output_dir: str
    fine_tuned_model_id: str  # the id it is served under once published
    validation_file: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    seed: int = 42
    suffix: str | None = None
    metadata: dict | None = None
    overrides: list[str] = field(default_factory=list)
    status: str = "queued"
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    error: dict | None = None
    trained_tokens: int = 0
    version: int = 0  # adapter versions published so far
    step: int = 0  # optimizer steps done
    from_config: bool = False

    def api(self) -> dict:
        hyper = {"batch_size": self.hyperparameters.get("batch_size", "auto"),
                 "learning_rate_multiplier": self.hyperparameters.get("learning_rate_multiplier", "auto"),
                 "n_epochs": self.hyperparameters.get("n_epochs", "auto")}
        return {"id": self.id, "object": "fine_tuning.job", "created_at": self.created_at,
                "finished_at": self.finished_at, "model": self.model, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "peftforge", "result_files": [], "status": self.status,
                "trained_tokens": self.trained_tokens if self.status in TERMINAL else None,
                "training_file": self.training_file, "validation_file": self.validation_file,
                "hyperparameters": hyper, "seed": self.seed, "error": self.error, "estimated_finish": None,
                "integrations": None, "metadata": self.metadata,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
                # peftforge's own fields
                "output_dir": self.output_dir, "version": self.version, "step": self.step}


class JobManager:
    def __init__(self, cfg: Config, engine, registry, tokenizer):
        self.cfg, self.engine, self.registry, self.tokenizer = cfg, engine, registry, tokenizer
        self.dir = Path(cfg.serving.jobs_dir)
        self.records: dict[str, JobRecord] = {}
        self.events: dict[str, list[dict]] = {}
        self.prepared: dict[str, Prepared] = {}  # jobs whose data were read at start-up
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="peftforge-jobs", daemon=True)

    # ---- start-up --------------------------------------------------------------------------
    def restore(self) -> None:
        """Records of earlier runs of this server: serve finished adapters, requeue the rest."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            rec = JobRecord(**json.loads(path.read_text()))
            self.records[rec.id] = rec
            events = path.with_suffix(".events.jsonl")
            self.events[rec.id] = [json.loads(x) for x in events.read_text().splitlines() if x] if events.exists() else []
            if rec.status == "succeeded":
                self._serve_saved(rec)
            elif rec.status not in TERMINAL:
                self._set(rec, status="queued")
                self._queue.append(rec.id)

    def add_config_job(self) -> None:
        """The config's own job (serving.finetune): validated now, so a bad config stops the start."""
        cfg = self.cfg
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(cfg.train.output_dir).resolve().name).strip("-") or "job"
        job_id = f"ftjob-{name}"
        rec = self.records.get(job_id)
        if rec is not None and rec.status in TERMINAL:
            if rec.status != "succeeded":
                log.warning("the config's job %s ended %s; start it again with a new train.output_dir", job_id, rec.status)
            return
        self.prepared[job_id] = prepare(cfg, self.tokenizer)  # UserError: exit 2 before serving
        if rec is None:
            rec = JobRecord(job_id, int(time.time()), self.registry.base_id, cfg.data.path, cfg.train.output_dir,
                            self.registry.finetuned_id(name), seed=cfg.train.seed, from_config=True,
                            validation_file=cfg.data.eval_path)
            self._save(rec)
            self.records[job_id], self.events[job_id] = rec, []
            self._queue.append(job_id)
        self._event(rec, "info", f"the config's fine-tuning job ({cfg.train.output_dir})")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()

    # ---- the API ---------------------------------------------------------------------------
    def create(self, body: JobCreate) -> dict:
        if body.model != self.registry.base_id:
            raise APIError(404 if self.registry.get(body.model) is None else 400,
                           f"jobs fine-tune the base model '{self.registry.base_id}', not '{body.model}'",
                           param="model", code="model_not_found")
        for name, path in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if path and not path.startswith("packaged:") and not Path(path).expanduser().exists():
                raise APIError(400, f"no such file on the server: {path}", param=name, code="file_not_found")
        for item in body.overrides:
            key = item.split("=", 1)[0]
            if "=" not in item or not key.startswith(OVERRIDABLE) or key in FIXED:
                raise APIError(400, f"override {item!r}: give key=value for a data., adapter., optim. or train. key "
                               f"(not {', '.join(FIXED)})", param="overrides")
        job_id = f"ftjob-{uuid.uuid4().hex[:20]}"
        hyper = body.hyper()
        rec = JobRecord(job_id, int(time.time()), body.model, body.training_file, str(self.dir / job_id),
                        self.registry.finetuned_id(f"{body.suffix}:{job_id}" if body.suffix else job_id),
                        validation_file=body.validation_file, seed=body.seed if body.seed is not None else self.cfg.train.seed,
                        suffix=body.suffix, metadata=body.metadata, overrides=list(body.overrides),
                        hyperparameters={k: v for k, v in hyper.model_dump().items() if v is not None})
        self._job_config(rec)  # a bad override or hyperparameter is the client's 400 now, not a failed job later
        with self._lock:
            self.records[job_id], self.events[job_id] = rec, []
            self._save(rec)
            self._queue.append(job_id)
            self._wake.notify_all()
        self._event(rec, "info", f"created fine-tuning job {job_id}")
        return rec.api()

    def get(self, job_id: str) -> JobRecord:
        rec = self.records.get(job_id)
        if rec is None:
            raise APIError(404, f"no fine-tuning job '{job_id}'", param="fine_tuning_job_id", code="not_found")
        return rec

    def list(self, after: str | None, limit: int) -> dict:
        recs = sorted(self.records.values(), key=lambda r: r.created_at, reverse=True)
        return _page([r.api() for r in recs], after, limit)

    def list_events(self, job_id: str, after: str | None, limit: int) -> dict:
        self.get(job_id)
        return _page(list(reversed(self.events.get(job_id, []))), after, limit)

    def cancel(self, job_id: str) -> dict:
        rec = self.get(job_id)
        if rec.status in TERMINAL:
            raise APIError(400, f"the job is already {rec.status}", param="fine_tuning_job_id")
        with self._lock:
            if rec.status in ("queued", "validating_files"):
                self._set(rec, status="cancelled", finished_at=int(time.time()))
                self._event(rec, "info", "cancelled before it started")
                return rec.api()
        self.engine.call(lambda e: e.cancel_job(job_id, "cancelled", "cancelled by request")).result(timeout=60)
        return rec.api()

    # ---- the worker: one job at a time --------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                rec = self.records[self._queue.popleft()]
                if rec.status != "queued":
                    continue
                self._set(rec, status="validating_files")
            try:
                self._run(rec)
            except Exception as exc:  # a job must not take the server down
                log.exception("fine-tuning job %s failed", rec.id)
                self._failed(rec, "error", f"{type(exc).__name__}: {exc}")

    def _run(self, rec: JobRecord) -> None:
        prepared = self.prepared.pop(rec.id, None)
        if prepared is None:
            try:
                prepared = prepare(self._job_config(rec), self.tokenizer)
                n_epochs = rec.hyperparameters.get("n_epochs")
                if isinstance(n_epochs, int):
                    t = prepared.cfg.train
                    t.max_steps = max(1, math.ceil(n_epochs * len(prepared.train_set) / (t.batch_size * t.gradient_accumulation_steps)))
            except UserError as e:
                self._failed(rec, "invalid_training_file" if "data" in (e.where or "") else "invalid_config", e.line(),
                             "training_file")
                return
        ended = threading.Event()

        def on_end(job) -> None:
            rec.trained_tokens += job.trained_tokens
            if job.status == "succeeded":
                self._set(rec, status="succeeded", finished_at=int(time.time()), fine_tuned_model=rec.fine_tuned_model_id)
            elif job.status == "failed":
                self._failed(rec, "training_error", job.error or "failed")
            elif job.status == "cancelled":
                self._set(rec, status="cancelled", finished_at=int(time.time()))
            else:  # the server stopped: resume on restart
                self._set(rec, status="queued")
            ended.set()

        def build(engine) -> None:
            with self._lock:
                if self._stopping or rec.status == "cancelled":
                    ended.set()
                    return
            job = CoservedJob(prepared, engine.model, job_id=rec.id, clock=engine.clock,
                              on_publish=lambda step: self._publish(engine, rec, step),
                              on_event=lambda message, data: self._event(rec, "info", message, data))
            engine.start_job(job, on_end)
            self._set(rec, status="running", step=job.step)
            if job.step and job.status == "running":  # resumed: serve the checkpoint's weights now
                self._publish(engine, rec, job.step)

        try:
            self.engine.call(build).result()
        except UserError as e:
            self._failed(rec, "invalid_config", e.line())
            return
        ended.wait()

    def _publish(self, engine, rec: JobRecord, step: int) -> None:
        """On the engine thread, from the job's step: copy the trainee into a served version."""
        version = rec.version + 1
        self.registry.publish(engine.model, rec.fine_tuned_model_id, rec.id, step, version)
        self._set(rec, version=version, step=step, fine_tuned_model=rec.fine_tuned_model_id)
        self._event(rec, "info", f"published {rec.fine_tuned_model_id} version {version} (step {step})",
                    {"version": version, "step": step})

    def _serve_saved(self, rec: JobRecord) -> None:
        adapter = Path(rec.output_dir) / "adapter"
        if not adapter.is_dir():
            log.warning("job %s succeeded but %s is gone; not serving it", rec.id, adapter)
            return

        def load(engine) -> None:
            name = f"ft_saved_{len(lora.adapter_names(engine.model))}"
            engine.model = lora.load_adapter(engine.model, str(adapter), name, where=str(adapter))
            self.registry.serve_saved(rec.fine_tuned_model_id, name, rec.id, rec.version, rec.step)

        self.engine.call(load).result()

    # ---- records ---------------------------------------------------------------------------
    def _job_config(self, rec: JobRecord) -> Config:
        if rec.from_config:
            return self.cfg
        data = self.cfg.to_dict()
        data["data"].update(path=rec.training_file, eval_path=rec.validation_file)
        data["train"].update(output_dir=rec.output_dir, resume="auto", overwrite=False, seed=rec.seed)
        hyper = rec.hyperparameters
        if isinstance(hyper.get("batch_size"), int):
            data["train"]["batch_size"] = hyper["batch_size"]
        if isinstance(hyper.get("learning_rate_multiplier"), (int, float)):
            data["optim"]["lr"] = data["optim"]["lr"] * hyper["learning_rate_multiplier"]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(data, f)
            f.flush()
            try:
                return load_config(f.name, rec.overrides)
            except UserError as e:
                raise APIError(400, e.line().replace(f.name, "the job's config"), param="overrides") from None

    def _set(self, rec: JobRecord, **changes) -> None:
        for key, value in changes.items():
            setattr(rec, key, value)
        self._save(rec)

    def _failed(self, rec: JobRecord, code: str, message: str, param: str | None = None) -> None:
        self._set(rec, status="failed", finished_at=int(time.time()), error={"code": code, "message": message,
                                                                            "param": param})
        self._event(rec, "error", f"failed: {message}")

    def _save(self, rec: JobRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{rec.id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(rec), indent=1))
        tmp.replace(path)

    def _event(self, rec: JobRecord, level: str, message: str, data: dict | None = None) -> None:
        event = {"id": f"ftevent-{uuid.uuid4().hex[:20]}", "object": "fine_tuning.job.event",
                 "created_at": int(time.time()), "level": level, "message": message, "data": data,
                 "type": "metrics" if data and "loss" in data else "message"}
        self.events.setdefault(rec.id, []).append(event)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{rec.id}.events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        log.info("%s: %s", rec.id, message)


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if after is not None:
        ids = [x["id"] for x in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
