"""The engine: one thread that owns the model and runs iterations of inference and fine-tuning.

peft's per-row adapter batches work only in eval mode and not from two threads (a second thread's
forward broke every concurrent training step on this machine), so this thread is the only one
that touches the model. Other threads talk to it through `submit`, `cancel` and `call` (run a
function on the engine thread between iterations: start or cancel a job, load an adapter).

One iteration (`step`):
1. take in new requests and calls;
2. plan the inference work (`scheduler.plan_inference`) and run it: one decode step for every
   decoding request (one batch, each row with its own adapter, left-padded KV cache), then the
   prefill chunks (each request with its own cache; a finished prompt's cache joins the batch);
   tokens go out to their clients as soon as they are sampled;
3. give the fine-tuning job what is left of the iteration's time budget and the budget earlier
   decode iterations banked, unit by unit (`scheduler.choose_ft_unit`); each unit's measured time
   updates the cost model.
Time comes from an injectable `clock`; how long a unit took from an injectable `meter` (tests
replace both with a simulation, so no test depends on wall time).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from trainer.serving import kv, lora
from trainer.serving.cost import CostModel, finetune_features
from trainer.serving.registry import Registry
from trainer.serving.request import Failed, Finished, GenRequest, Token
from trainer.serving.sampling import choose
from trainer.serving.scheduler import Limits, choose_ft_unit, plan_inference
from trainer.serving.text import TextStream

log = logging.getLogger(__name__)
Meter = Callable[[str, list, Callable[[], None]], float]  # (kind, features, work) -> seconds


@dataclass
class IterationStats:
    index: int
    decode_rows: int = 0
    prefill_tokens: int = 0
    ft_forward_tokens: int = 0
    ft_backward_tokens: int = 0
    ft_steps: int = 0
    budget_s: float = 0.0
    predicted_inference_s: float = 0.0
    inference_s: float = 0.0
    ft_s: float = 0.0
    ft_forced: bool = False
    ft_bank_s: float = 0.0  # banked decode budget after this iteration (scheduler.py)
    waiting: int = 0
    units: list = field(default_factory=list)  # (kind, positions, rows, past, real tokens, predicted s, measured s)

    @property
    def seconds(self) -> float:
        return self.inference_s + self.ft_s


class Engine:
    def __init__(self, model, tokenizer, registry: Registry, serving_cfg, *, cost: CostModel | None = None,
                 clock: Callable[[], float] = time.perf_counter, meter: Meter | None = None, metrics=None):
        self.model = model.eval()
        self.tokenizer, self.registry, self.cfg = tokenizer, registry, serving_cfg
        self.limits = Limits.from_config(serving_cfg)
        self.cost = cost or CostModel.default()
        self.clock = clock
        self.meter = meter or self._wall_meter
        self.metrics = metrics
        config = (model.get_base_model() if lora.is_peft(model) else model).config
        self.batch = kv.BatchCache(config)
        self._config = config
        self._cache_kwarg = kv.cache_kwarg(model)
        self.eos = _eos_ids(model, tokenizer)
        self.waiting: deque[GenRequest] = deque()
        self.prefilling: list[GenRequest] = []
        self.decoding: list[GenRequest] = []  # row i of the batch cache is decoding[i]
        self.job = None  # the CoservedJob training now
        self.job_hooks: dict = {}  # callbacks of the job's owner: on_end(job)
        self.ft_waited = 0
        self.ft_bank = 0.0  # seconds of decode budget banked for fine-tuning (scheduler.py)
        self.iterations = 0
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_at: float | None = None  # drain deadline once stopping
        self._stopped = threading.Event()
        self.accepting = True
        self._log = open(serving_cfg.iteration_log, "a") if serving_cfg.iteration_log else None

    # ---- any thread -------------------------------------------------------------------------
    def submit(self, request: GenRequest) -> None:
        with self._lock:
            if not self.accepting:
                request.sink(Failed(503, "the server is shutting down", "shutting_down"))
                return
            if len(self.waiting) + sum(1 for k, _ in self._inbox if k == "submit") >= self.cfg.max_waiting:
                request.sink(Failed(503, "too many requests are waiting; retry later", "overloaded"))
                return
            request.arrival = self.clock()
            self._inbox.append(("submit", request))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id))
        self._wake.set()

    def call(self, fn: Callable[["Engine"], object]) -> Future:
        """Run fn(engine) on the engine thread between iterations; its result or error in the future."""
        future: Future = Future()
        with self._lock:
            self._inbox.append(("call", (fn, future)))
        self._wake.set()
        return future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="peftforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` s (then fail them
        with 503), checkpoint the fine-tuning job, and end the thread."""
        with self._lock:
            self.accepting = False
            self._stop_at = self.clock() + timeout
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        else:
            self._shutdown()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding or self._inbox)

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # training forwards enable it themselves
        try:
            while True:
                if self._stop_at is not None and (not self.busy or self.clock() >= self._stop_at):
                    break
                stats = self.step()
                if stats is None:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._take_inbox()
        for request in list(self.waiting) + self.prefilling + self.decoding:
            self._fail(request, 503, "the server shut down before this request finished", "shutting_down")
        self.waiting.clear()
        self.prefilling.clear()
        self.decoding.clear()
        self.batch.keep([])
        if self.job is not None:
            self.job.interrupt("queued", "the server stopped; the job resumes from its last checkpoint when it restarts")
            self._end_job()
        if self._log:
            self._log.close()
        self._stopped.set()

    def step(self) -> IterationStats | None:
        """One iteration; None when there was nothing to do. Runs with autograd off, on the engine
        thread and in tests alike: fine-tuning units turn it on for what they train."""
        with torch.no_grad():
            return self._step()

    def _step(self) -> IterationStats | None:
        self._take_inbox()
        job_work = self.job is not None and self.job.active
        if not (self.waiting or self.prefilling or self.decoding or job_work):
            return None
        stats = IterationStats(self.iterations, waiting=len(self.waiting))
        self.iterations += 1
        plan = plan_inference(len(self.decoding), self.batch.rows * self.batch.width,
                              [(r, r.to_prefill, r.prefilled) for r in self.prefilling],
                              [(r, len(r.prompt)) for r in self.waiting], self.cost, self.limits)
        stats.budget_s, stats.predicted_inference_s = plan.time_budget, plan.predicted
        stats.decode_rows, stats.prefill_tokens = plan.decode_rows, plan.tokens - plan.decode_rows
        for request in plan.admit:
            self._admit(request)
        if plan.tokens:
            features = plan.features()
            # no_grad (step), not inference_mode: its tensors could never meet a training graph
            stats.inference_s = self.meter("inference", features, lambda: self._infer(plan))
            self.cost.inference.observe(features, stats.inference_s)
        if self.job is not None and self.job.active:
            self._finetune(plan, stats)
        # bank what this decode iteration left of its budget (or owe what it overran), within
        # one bank either way; nothing carries over an idle iteration
        bank = self.limits.bank_s
        self.ft_bank = min(bank, max(-bank, self.ft_bank + plan.time_budget - stats.seconds)) if plan.decode_rows else 0.0
        stats.ft_bank_s = self.ft_bank
        if self.metrics:
            self.metrics.on_iteration(self, stats)
        if self._log:
            self._write_log(stats)
        return stats

    # ---- requests ---------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "submit":
                if self.registry.get(item.model) is None:  # checked by the API; a model never disappears
                    item.sink(Failed(404, f"the model '{item.model}' does not exist", "model_not_found"))
                else:
                    self.waiting.append(item)
            elif kind == "cancel":
                self._cancel(item)
            else:
                fn, future = item
                try:
                    future.set_result(fn(self))
                except BaseException as exc:  # the caller gets the error; the engine goes on
                    future.set_exception(exc)

    def _admit(self, request: GenRequest) -> None:
        self.waiting.remove(request)
        request.adapter, request.version = self.registry.pin(request.model)
        request.started = self.clock()
        request.cache = kv.new_cache(self._config)
        request.text = TextStream(self.tokenizer, request.params.stop)
        request.generator = request.params.generator()
        self.prefilling.append(request)

    def _cancel(self, request_id: str) -> None:
        for queue in (self.waiting, self.prefilling):
            for request in list(queue):
                if request.id == request_id:
                    queue.remove(request)
                    self._release(request)
                    return
        rows = [i for i, r in enumerate(self.decoding) if r.id == request_id]
        if rows:
            self._release(self.decoding[rows[0]])
            self._keep_rows([i for i in range(len(self.decoding)) if i != rows[0]])

    def _release(self, request: GenRequest) -> None:
        if request.adapter and not request.done:
            self.registry.unpin(request.adapter)
        request.done, request.cache = True, None

    def _keep_rows(self, rows: list[int]) -> None:
        self.batch.keep(rows)
        self.decoding = [self.decoding[i] for i in rows]

    def _fail(self, request: GenRequest, status: int, message: str, code: str | None = None) -> None:
        was_done = request.done
        self._release(request)
        if not was_done:
            request.sink(Failed(status, message, code))

    # ---- inference --------------------------------------------------------------------------
    def _infer(self, plan) -> None:
        if self.decoding:
            try:
                self._decode()
            except Exception as exc:  # no request may take the engine down: fail the batch, go on
                log.exception("decode step failed")
                for request in self.decoding:
                    self._fail(request, 500, f"the engine failed on this batch: {type(exc).__name__}: {exc}")
                self._keep_rows([])
        for request, n, _ in plan.prefill:
            if request.done:
                continue
            try:
                self._prefill(request, n)
            except Exception as exc:
                log.exception("prefill failed")
                if request in self.prefilling:
                    self.prefilling.remove(request)
                self._fail(request, 500, f"the engine failed on this request: {type(exc).__name__}: {exc}")

    def _forward(self, input_ids, cache, adapters: list[str], **kwargs):
        with lora.routed(self.model, adapters) as routing:
            return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                              **{self._cache_kwarg: cache}, **routing, **kwargs)

    def _decode(self) -> None:
        rows = self.decoding
        mask, positions = self.batch.step_inputs()
        out = self._forward(torch.tensor([[r.output[-1]] for r in rows]), self.batch.cache,
                            [r.adapter for r in rows], attention_mask=mask, position_ids=positions)
        self.batch.stepped()
        logits = out.logits[:, -1, :]
        for i, request in enumerate(rows):
            self._emit(request, choose(logits[i], request.params, request.generator))
        if any(r.done for r in rows):
            self._keep_rows([i for i, r in enumerate(rows) if not r.done])

    def _prefill(self, request: GenRequest, n: int) -> None:
        start, end = request.prefilled, request.prefilled + n
        out = self._forward(torch.tensor([request.prompt[start:end]]), request.cache, [request.adapter],
                            position_ids=torch.arange(start, end)[None])
        request.prefilled = end
        if request.to_prefill:
            return
        self.prefilling.remove(request)
        self._emit(request, choose(out.logits[0, -1], request.params, request.generator))
        if not request.done:
            self.batch.add(request.cache)
            request.cache = None
            self.decoding.append(request)

    def _emit(self, request: GenRequest, token: int) -> None:
        now = self.clock()
        if request.first_token_at is None:
            request.first_token_at = now
        else:
            request.gaps.append(now - request.last_token_at)
        request.last_token_at = now
        if token in self.eos and not request.params.ignore_eos:
            self._finish(request, "stop", request.text.finish())
            return
        request.output.append(token)
        delta, stopped = request.text.push(token)
        if stopped:
            self._finish(request, "stop", delta)
        elif len(request.output) >= request.params.max_tokens:
            self._finish(request, "length", delta + request.text.finish())
        else:
            request.sink(Token(delta, request.version))

    def _finish(self, request: GenRequest, reason: str, delta: str) -> None:
        request.finish_reason = reason
        if delta:
            request.sink(Token(delta, request.version))
        self._release(request)
        request.sink(Finished(reason, len(request.prompt), len(request.output), request.version))
        if self.metrics:
            self.metrics.on_finish(request, self.clock())

    # ---- fine-tuning ------------------------------------------------------------------------
    def start_job(self, job, on_end: Callable[[object], None]) -> None:
        """Make `job` (a CoservedJob built on this thread) the one trained in the iterations."""
        assert self.job is None, "one fine-tuning job at a time"
        self.job, self.job_hooks = job, {"on_end": on_end}
        self.model = job.model  # a bare base model was wrapped by peft to hold the adapter
        self.ft_waited = 0

    def cancel_job(self, job_id: str, status: str, message: str) -> bool:
        """Stop the job training now if it is `job_id` (engine thread, through `call`)."""
        if self.job is None or self.job.job_id != job_id:
            return False
        self.job.interrupt(status, message)
        self._end_job()
        return True

    def _finetune(self, plan, stats: IterationStats) -> None:
        job = self.job
        bank = self.ft_bank if plan.decode_rows else 0.0
        time_left = plan.time_budget - stats.inference_s + bank
        tokens_left = self.limits.max_batch_tokens - plan.tokens
        # the most a later iteration can give one backward: its own share and a full bank
        ft_share = max(plan.time_budget - plan.predicted, 0.0) + (self.limits.bank_s if plan.decode_rows else 0.0)
        forced = self.limits.ft_max_wait_iters > 0 and self.ft_waited >= self.limits.ft_max_wait_iters
        ran = 0
        try:
            while job.active:
                pending = job.pending()
                if pending is None:
                    break
                unit = choose_ft_unit(pending, time_left, tokens_left, ft_share, self.cost, self.limits,
                                      forced and ran == 0, idle=plan.idle)
                if unit is None:
                    break
                kind, tokens = unit
                features = finetune_features(tokens, pending.past, pending.rows)
                model = {"forward": self.cost.ft_forward, "backward": self.cost.ft_backward}.get(kind)
                predicted = model.predict(features) if model else 0.0
                trained_before = job.trained_tokens
                seconds = self.meter("ft_" + kind, features, lambda: job.run(kind, tokens))
                if model:
                    model.observe(features, seconds)
                real = job.trained_tokens - trained_before  # a forward's real (not padding) tokens
                stats.units.append((kind, tokens, pending.rows, pending.past, real, round(predicted, 5),
                                    round(seconds, 5)))
                stats.ft_forced |= forced and ran == 0
                ran += 1
                time_left -= seconds
                stats.ft_s += seconds
                if kind == "forward":
                    stats.ft_forward_tokens += real
                    tokens_left -= tokens * pending.rows
                elif kind == "backward":
                    stats.ft_backward_tokens += tokens * pending.rows
                else:
                    stats.ft_steps += 1
        except Exception as exc:  # a failing job must not take serving down
            log.exception("fine-tuning unit failed")
            job.fail(f"{type(exc).__name__}: {exc}")
        self.ft_waited = 0 if ran else self.ft_waited + 1
        if not job.active:
            self._end_job()

    def _end_job(self) -> None:
        job, on_end = self.job, self.job_hooks.get("on_end")
        self.job, self.job_hooks = None, {}
        self.model = lora.detach_trainee(self.model)
        if on_end:
            on_end(job)

    # ---- helpers ----------------------------------------------------------------------------
    def _wall_meter(self, kind: str, features: list, work: Callable[[], None]) -> float:
        began = self.clock()
        work()
        return self.clock() - began

    def _write_log(self, s: IterationStats) -> None:
        row = {"i": s.index, "t": round(self.clock(), 4), "decode_rows": s.decode_rows,
               "prefill_tokens": s.prefill_tokens, "ft_forward_tokens": s.ft_forward_tokens,
               "ft_backward_tokens": s.ft_backward_tokens, "ft_steps": s.ft_steps, "waiting": s.waiting,
               "budget_s": round(s.budget_s, 4), "predicted_inference_s": round(s.predicted_inference_s, 5),
               "inference_s": round(s.inference_s, 5), "ft_s": round(s.ft_s, 5), "ft_forced": s.ft_forced,
               "ft_bank_s": round(s.ft_bank_s, 5), "units": s.units}
        if s.index % 100 == 0:
            row["cost_model"] = self.cost.coefficients()
        self._log.write(json.dumps(row) + "\n")
        self._log.flush()


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return ids
