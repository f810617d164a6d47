"""Prometheus metrics of a server (GET /metrics), named after vLLM's where one exists.

Each server has its own registry (tests start several in one process). Request latencies are
observed when a request finishes; the rest is updated after every engine iteration.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
P = "peftforge_"


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between consecutive output tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to admission into a decode slot",
                               registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter(P + "requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge(P + "num_requests_running", "Requests holding a slot (prefill or decode)", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.iteration = Histogram(P + "iteration_seconds", "Wall time of one engine iteration", registry=r,
                                   buckets=LATENCY_BUCKETS)
        self.iteration_tokens = Counter(P + "iteration_tokens", "Tokens processed by engine iterations", ["kind"],
                                        registry=r)
        self.ft_tokens_per_s = Gauge(P + "finetune_tokens_per_second",
                                     "Fine-tuning forward tokens per second over the last iterations", registry=r)
        self.ft_steps = Counter(P + "finetune_optimizer_steps", "Optimizer steps of co-served fine-tuning", registry=r)
        self.adapter_version = Gauge(P + "adapter_version", "Published version served for a fine-tuned model",
                                     ["model"], registry=r)
        self.staleness = Gauge(P + "adapter_staleness_steps",
                               "Optimizer steps the trainee is ahead of the version served", ["model"], registry=r)
        self.cost = Gauge(P + "cost_model_seconds", "Coefficients of the scheduler's online cost model",
                          ["work", "feature"], registry=r)
        self._window: list[tuple[float, int]] = []  # (iteration seconds, ft forward tokens)

    def watch(self, engine) -> None:
        """Queue gauges read at scrape time (an idle engine runs no iterations to update them)."""
        self.running.set_function(lambda: len(engine.prefilling) + len(engine.decoding))
        self.waiting.set_function(lambda: len(engine.waiting))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_finish(self, request, now: float) -> None:
        self.requests.labels(finish_reason=request.finish_reason).inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.output))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrival)
        for gap in request.gaps:
            self.itl.observe(gap)
        self.e2e.observe(now - request.arrival)
        if request.started is not None:
            self.queue.observe(request.started - request.arrival)

    def on_iteration(self, engine, stats) -> None:
        self.iteration.observe(stats.seconds)
        for kind, n in (("decode", stats.decode_rows), ("prefill", stats.prefill_tokens),
                        ("finetune_forward", stats.ft_forward_tokens), ("finetune_backward", stats.ft_backward_tokens)):
            if n:
                self.iteration_tokens.labels(kind=kind).inc(n)
        if stats.ft_steps:
            self.ft_steps.inc(stats.ft_steps)
        self._window = (self._window + [(stats.seconds, stats.ft_forward_tokens)])[-200:]
        seconds = sum(s for s, _ in self._window)
        self.ft_tokens_per_s.set(sum(n for _, n in self._window) / seconds if seconds else 0.0)
        job = engine.job
        for card in engine.registry.cards():
            if card.get("version"):
                self.adapter_version.labels(model=card["id"]).set(card["version"])
                if job is not None and card.get("job") == getattr(job, "job_id", None):
                    self.staleness.labels(model=card["id"]).set(job.step - (card["step"] or 0))
        if stats.index % 20 == 0:
            for work, coefs in engine.cost.coefficients().items():
                for feature, value in coefs.items():
                    self.cost.labels(work=work, feature=feature).set(value)
