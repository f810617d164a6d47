"""An engine driven step by step on the test thread, with a co-served tiny-llama job."""
from __future__ import annotations

import itertools

from cli_runner import TINY
from trainer.config import load_config
from trainer.models import load_model
from trainer.serving import lora
from trainer.serving.cost import CostModel
from trainer.serving.engine import Engine
from trainer.serving.finetune import CoservedJob, prepare
from trainer.serving.registry import Registry
from trainer.serving.request import GenRequest
from trainer.serving.sampling import SamplingParams

COMMON = ["train.max_steps=4", "train.batch_size=4", "train.gradient_accumulation_steps=2", "data.max_length=40",
          "data.max_examples=40", "train.warmup_steps=1", "train.eval_batches=1", "adapter.dropout=0.0",
          "serving.publish_every=2", "serving.ft_chunk_tokens=12", "serving.ft_min_chunk=4"]
# units cost a good part of the 180 ms budget: a few fine-tuning units per iteration, beside decoding
SMALL_UNITS = CostModel.fixed([0.0, 0.02, 0.0, 0.001, 0.0], [0.01, 0.008, 0.0], [0.01, 0.016, 0.0])


_ids = itertools.count()


def lively(model, seed: int = 0, std: float = 0.1):
    """Re-draw a tiny random model's matrices larger: at the default init its greedy answer is the
    prompt's last token repeated, which would hide position, mask and cache mistakes."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


class SimTime:
    """Simulated seconds: every unit of engine work takes what the `true` cost model says."""

    def __init__(self, true: CostModel):
        self.true, self.t = true, 0.0

    def now(self) -> float:
        return self.t

    def meter(self, kind, features, work) -> float:
        work()
        model = {"inference": self.true.inference, "ft_forward": self.true.ft_forward,
                 "ft_backward": self.true.ft_backward}.get(kind)
        seconds = model.predict(features) if model else 0.0005  # the optimizer step
        self.t += seconds
        return seconds


class Harness:
    """An engine with a fixed cost model and a co-served job (TINY + COMMON + extra overrides)."""

    def __init__(self, tokenizer, out, *extra, static_adapter=None, cost=SMALL_UNITS, **engine_kwargs):
        _reset_accelerate()
        self.cfg = load_config(TINY, [f"train.output_dir={out}", *COMMON, *extra])
        self.tokenizer = tokenizer
        model = load_model(self.cfg.model, tokenizer).eval()
        self.registry = Registry("tiny-llama")
        if static_adapter:
            model = lora.load_adapter(model, static_adapter, "user_0", where="test")
            self.registry.add_adapter("other", "user_0")
        if "meter" not in engine_kwargs:  # simulated time by default: no decision depends on the machine
            self.sim = SimTime(cost)
            engine_kwargs.update(clock=self.sim.now, meter=self.sim.meter)
        self.engine = Engine(model, tokenizer, self.registry, self.cfg.serving, cost=cost, **engine_kwargs)
        self.published, self.ended, self.trainee_at = [], [], {}
        self.start_job()

    def start_job(self):
        _reset_accelerate()
        prepared = prepare(self.cfg, self.tokenizer)
        self.job = CoservedJob(prepared, self.engine.model, job_id="job", on_publish=self._publish,
                               on_event=self._event)
        self.engine.start_job(self.job, self.ended.append)

    def _event(self, message, data):
        if data and "step" in data:  # right after the optimizer step, before any publish
            self.trainee_at[data["step"]] = self.trainee_state()

    def _publish(self, step):
        self.published.append(step)
        self.registry.publish(self.engine.model, "ft:tiny-llama:job", "job", step, len(self.published))

    def request(self, model, text, max_tokens=6):
        events = []
        req = GenRequest(f"r{next(_ids)}", model, self.tokenizer(text)["input_ids"],
                         SamplingParams(max_tokens, temperature=0), events.append)
        self.engine.submit(req)
        return req, events

    def trainee_state(self):
        return {n: p.detach().clone() for n, p in self.engine.model.named_parameters()
                if lora.TRAINEE in n.split(".")}


