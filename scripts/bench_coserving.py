"""Co-serving benchmark: SmolLM2-135M-Instruct on this CPU, Poisson arrivals of chat requests whose
prompt and answer lengths come from the packaged chit-chat conversations.

    python scripts/bench_coserving.py --rates 0.1,0.2,0.4 --duration 120 --out docs/results/coserving.json
    python scripts/bench_coserving.py --plot docs/results/coserving.json     # table + docs/results/coserving.png

Cells (each measured for --duration seconds of arrivals, then drained):
  finetune      (b) the fine-tuning job alone: the co-serving engine with no requests (chunked units),
                and `peak`: the trainer's own train_step on whole micro-batches (train.py's step)
  inference     (a) the engine serving requests, no job
  timeshare     (c) the engine serving requests, and every --every iterations (or whenever nothing
                decodes) one whole optimizer step of the job runs between two decode iterations
  coserve       (d) the engine serving requests while the job trains in the same iterations
  generate      the floor: one request at a time with transformers' `generate` (FIFO)
At every rate the request-serving cells run in an order that alternates between rates (ABBA), so
drift in the machine's load hits every cell alike. Each cell runs in a process of its own.

What is counted:
- TPOT of a request: (last token time - first token time) / (tokens - 1); p50/p99 over requests.
  TTFT: first token time - arrival. Output tokens/s: tokens of finished requests / window.
- Fine-tuning tokens/s: tokens forwarded through the training model per second of the window
  (FlexLLM's definition: forward tokens, prompt and answer positions alike); loss tokens/s and
  optimizer steps are reported too. "kept" = a cell's fine-tuning tokens/s / the finetune cell's.
- Requests generate exactly the reference answer length (EOS ignored), so every cell does the same
  inference work for the same arrivals.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_PROMPT, MAX_ANSWER = 256, 96


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def workload(tokenizer, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, answer tokens) from packaged chit-chat: the conversation up to the first assistant
    reply, and that reply's length (+1 for the end-of-turn token), capped."""
    from trainer.data.packaged import load
    rows = load("chitchat", "data.path")
    random.Random(seed).shuffle(rows)
    out = []
    for row in rows:
        msgs = row["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = tokenizer.apply_chat_template(msgs[:first], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        answer = len(tokenizer(msgs[first]["content"], add_special_tokens=False)["input_ids"]) + 1
        if len(ids) <= MAX_PROMPT:
            out.append((list(ids), max(2, min(answer, MAX_ANSWER))))
        if len(out) == n:
            return out
    return out


def arrivals(rate: float, duration: float, seed: int) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


def summarize(requests: list[dict], window: float) -> dict:
    done = [r for r in requests if r.get("tokens")]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in done if len(r["times"]) > 1]
    ttft = [r["times"][0] - r["arrival"] for r in done]
    gaps = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 4) if len(xs) > 1 else (
            round(xs[0], 4) if xs else None)

    in_window = sum(sum(1 for t in r["times"] if t <= window) for r in done)
    # seconds of the window with at least one request in the engine (arrival to last token): in the
    # inference-only cell, one minus its share is the most that a co-serving schedule which fine-tunes only
    # between requests can keep
    spans = sorted((r["arrival"], r["times"][-1] if r.get("times") else window) for r in requests)
    busy, end = 0.0, 0.0
    for start, stop in spans:
        start, stop = max(start, end), min(stop, window)
        busy, end = busy + max(0.0, stop - start), max(end, stop)
    return {"busy_s": round(busy, 2), "requests": len(requests), "finished": len(done), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "tpot_mean": round(statistics.fmean(tpot), 4) if tpot else None,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p99": pct(gaps, 99),
            "output_tokens_per_s": round(in_window / window, 3)}


class Collector:
    """Stands in for the server's Prometheus metrics: keeps every iteration's stats."""

    def __init__(self):
        self.rows = []

    def on_iteration(self, engine, stats):
        self.rows.append((engine.clock(), stats))

    def on_finish(self, request, now):
        pass


def make_cfg(out_dir: str, extra: list[str]):
    from trainer.config import load_config
    return load_config(ROOT / "configs" / "serve-smollm2.yaml",
                       [f"train.output_dir={out_dir}", "train.max_steps=100000", "train.save_every=0",
                        "train.resume=null", "train.overwrite=true", "serving.publish_every=10", *extra])


def engine_cell(model, tokenizer, cfg, kind: str, rate: float, duration: float, seed: int, every: int):
    """Serve Poisson arrivals for `duration` s (none for the finetune cell), with or without the job."""
    from trainer.serving.engine import Engine
    from trainer.serving.finetune import CoservedJob, prepare
    from trainer.serving.registry import Registry
    from trainer.serving.request import Finished, GenRequest, Token
    from trainer.serving.sampling import SamplingParams

    collector = Collector()
    engine_cls = TimeShareEngine.make(every) if kind == "timeshare" else Engine
    engine = engine_cls(model, tokenizer, Registry("smollm2"), cfg.serving, metrics=collector)
    job_box = {}
    if kind in ("finetune", "timeshare", "coserve"):
        from accelerate.state import AcceleratorState, GradientState, PartialState
        AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
        prepared = prepare(cfg, tokenizer)

        def start(e):
            job = CoservedJob(prepared, e.model, on_publish=lambda step: None, on_event=lambda m, d: None,
                              job_id="bench")
            e.start_job(job, lambda j: None)
            job_box["job"] = job
        engine.call(start)
    engine.start()
    while "job" not in job_box and kind != "inference":
        time.sleep(0.01)
    t0 = time.perf_counter()
    requests, lock = [], threading.Lock()
    if kind != "finetune":
        work = workload(tokenizer, 10_000, seed)
        for i, at in enumerate(arrivals(rate, duration, seed)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            prompt, n = work[i % len(work)]
            rec = {"arrival": time.perf_counter() - t0, "times": [], "tokens": 0, "n": n}

            def sink(event, rec=rec):
                if isinstance(event, Token):
                    rec["times"].append(time.perf_counter() - t0)
                elif isinstance(event, Finished):
                    rec["times"].append(time.perf_counter() - t0)
                    rec["tokens"] = event.completion_tokens
            with lock:
                requests.append(rec)
            engine.submit(GenRequest(f"b{i}", "smollm2", prompt, SamplingParams(n, temperature=0, ignore_eos=True), sink))
    time.sleep(max(0.0, t0 + duration - time.perf_counter()))
    window_end = time.perf_counter() - t0
    job = job_box.get("job")
    ft = _ft_window(collector, t0, window_end)
    if job is not None:
        ft.update(steps=job.step)
        engine.call(lambda e: e.cancel_job("bench", "cancelled", "benchmark cell over")).result()
    drain = time.perf_counter() + 120
    while engine.busy and time.perf_counter() < drain:
        time.sleep(0.05)
    engine.stop(timeout=0)
    # the finish event is one more timestamp: drop it from the token times (it is not a token)
    for r in requests:
        if r["tokens"]:
            r["times"] = r["times"][:r["tokens"]]
    out = summarize(requests, window_end) if kind != "finetune" else {}
    out.update(ft)
    decode_iters = [s for _, s in collector.rows if s.decode_rows]
    if decode_iters:
        out["decode_iteration_p50"] = round(statistics.median(s.seconds for s in decode_iters), 4)
        out["mean_decode_rows"] = round(statistics.fmean(s.decode_rows for s in decode_iters), 2)
    out["cost_model"] = engine.cost.coefficients()
    return out


def _ft_window(collector, t0, end) -> dict:
    rows = [s for t, s in collector.rows if t - t0 <= end]
    fwd = sum(s.ft_forward_tokens for s in rows)
    units = {}  # per kind: how many units, their positions and their measured seconds
    for kind, positions, _, _, _, _, seconds in (u for s in rows for u in s.units):
        n, pos, sec = units.get(kind, (0, 0, 0.0))
        units[kind] = (n + 1, pos + positions, round(sec + seconds, 3))
    return {"ft_tokens_per_s": round(fwd / end, 2), "ft_steps_in_window": sum(s.ft_steps for s in rows),
            "forced_units": sum(s.ft_forced for s in rows),
            "units": {k: {"count": n, "positions": pos, "seconds": sec} for k, (n, pos, sec) in units.items()},
            "unit_costs": unit_costs(rows)}


def unit_costs(rows) -> dict:
    """Forward and backward units by where they ran ("beside-decode": an iteration that also decoded;
    "alone") and whether they started at position 0 of their group or after a cached past: count,
    summed seconds, positions x rows, real tokens, and the median seconds per 100 real tokens
    (forwards) or per 100 positions x rows (backwards)."""
    groups: dict[str, list] = {}
    for s in rows:
        beside = "beside-decode" if s.decode_rows else "alone"
        for kind, positions, n_rows, past, real, _, seconds in s.units:
            if kind != "step":
                key = f"{kind}/{beside}/{'past' if past else 'from-0'}"
                groups.setdefault(key, []).append((seconds, positions * n_rows, real))
    out = {}
    for key, xs in sorted(groups.items()):
        forward = key.startswith("forward")
        per = [1e2 * sec / (real if forward else area) for sec, area, real in xs if (real if forward else area)]
        out[key] = {"count": len(xs), "seconds": round(sum(x[0] for x in xs), 2),
                    "positions_x_rows": sum(x[1] for x in xs), "real_tokens": sum(x[2] for x in xs),
                    "median_s_per_100": round(statistics.median(per), 4) if per else None}
    return out


class TimeShareEngine:
    """(c): whole optimizer steps between decode iterations, every `every` iterations."""

    @staticmethod
    def make(every: int):
        from trainer.serving.engine import Engine

        class _TimeShare(Engine):
            def _finetune(self, plan, stats):
                if self.decoding and self.iterations % every:
                    return
                job, began = self.job, self.clock()
                while job.active:
                    pending = job.pending()
                    trained_before = job.trained_tokens
                    job.run(pending.kind, pending.tokens)
                    if pending.kind == "forward":
                        stats.ft_forward_tokens += job.trained_tokens - trained_before
                    elif pending.kind == "backward":
                        stats.ft_backward_tokens += pending.tokens * pending.rows
                    else:
                        stats.ft_steps += 1
                        break
                stats.ft_s = self.clock() - began
                if not job.active:
                    self._end_job()
        return _TimeShare


def generate_cell(model, tokenizer, rate: float, duration: float, seed: int) -> dict:
    """The floor: a FIFO server that answers one request at a time with `generate`."""
    import queue

    import torch
    from transformers.generation.streamers import BaseStreamer

    work, q, requests = workload(tokenizer, 10_000, seed), queue.Queue(), []
    t0 = time.perf_counter()

    class Times(BaseStreamer):
        def __init__(self, rec):
            self.rec, self.first = rec, True

        def put(self, value):
            if self.first:  # generate passes the prompt first
                self.first = False
                return
            self.rec["times"].append(time.perf_counter() - t0)

        def end(self):
            self.rec["tokens"] = len(self.rec["times"])

    def worker():
        while True:
            item = q.get()
            if item is None:
                return
            rec, prompt, n = item
            ids = torch.tensor([prompt])
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, streamer=Times(rec), pad_token_id=tokenizer.pad_token_id)

    thread = threading.Thread(target=worker)
    thread.start()
    for i, at in enumerate(arrivals(rate, duration, seed)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        prompt, n = work[i % len(work)]
        rec = {"arrival": time.perf_counter() - t0, "times": [], "tokens": 0}
        requests.append(rec)
        q.put((rec, prompt, n))
    time.sleep(max(0.0, t0 + duration - time.perf_counter()))
    window_end = time.perf_counter() - t0
    q.put(None)
    thread.join(timeout=600)
    return summarize(requests, window_end)


def peak_cell(cfg, tokenizer, seconds: float) -> dict:
    """The trainer's own step (train.py's train_step on whole micro-batches) for `seconds`."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import set_seed

    from trainer.distributed import make_accelerator
    from trainer.job import build_job, load_data, train_step
    from trainer.loop import micro_batch_stream
    AcceleratorState._reset_state(True), GradientState._reset_state(), PartialState._reset_state()
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    train_set, eval_set = load_data(cfg, tokenizer)
    job = build_job(cfg, accelerator, tokenizer=tokenizer, data=(train_set, eval_set))
    stream = micro_batch_stream(cfg, len(train_set), accelerator)
    job.model.train()
    step, tokens, began = 0, 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        micro = [job.task.collate([train_set[i] for i in stream.next_indices()])
                 for _ in range(cfg.train.gradient_accumulation_steps)]
        tokens += sum(int(mb["attention_mask"].sum()) for mb in micro)
        train_step(job, micro, step)
        step += 1
    elapsed = time.perf_counter() - began
    return {"ft_tokens_per_s": round(tokens / elapsed, 2), "steps": step, "seconds": round(elapsed, 1)}


def planned_cells(args) -> list[tuple[str, float]]:
    rates = [float(r) for r in args.rates.split(",")]
    order = ["inference", "coserve", "timeshare", "generate"]
    cells = [("finetune", 0.0)] if "finetune" in args.cells else []
    for i, rate in enumerate(rates):
        kinds = [k for k in (order if i % 2 == 0 else order[::-1]) if k in args.cells]
        if args.slo_vs_inference:  # the co-serving cell's target comes from the inference-only cell
            kinds.sort(key=lambda k: k != "inference")
        cells += [(k, rate) for k in kinds]
    return cells


def cell_name(kind: str, rate: float) -> str:
    return f"{kind}@{rate:g}" if kind != "finetune" else "finetune"


def run(args) -> None:
    """Each cell in a fresh process: cells that ran earlier in the same process slowed the later
    ones (a co-serving cell after the fine-tune-only and train_step cells ran its units 20-30%
    slower per token than the same cell in a process of its own)."""
    out_path = Path(args.out)
    for kind, rate in planned_cells(args):
        name = cell_name(kind, rate)
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        if name in results and not args.redo:
            print(f"skip {name} (in {out_path})", flush=True)
            continue
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--cell", name], check=True)


def measure_cell(args) -> None:
    import torch

    from trainer.models import load_tokenizer
    from trainer.serving.server import load_served_model
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    kind, _, rate = args.cell.partition("@")
    rate = float(rate or 0)
    tmp = tempfile.mkdtemp(prefix="bench-coserving-")
    slo_ms = args.tpot_slo_ms
    if kind == "coserve" and args.slo_vs_inference:
        slo_ms = round(args.slo_vs_inference * results[cell_name("inference", rate)]["tpot_p50"] * 1000, 1)
    cfg = make_cfg(tmp + "/job", [f"serving.tpot_slo_ms={slo_ms}", f"serving.max_running={args.max_running}"])
    tokenizer = load_tokenizer(cfg.model)
    load = uptime()
    began = time.perf_counter()
    if kind == "generate":
        row = generate_cell(load_served_model(cfg.model, tokenizer), tokenizer, rate, args.duration, args.seed)
    else:
        row = engine_cell(load_served_model(cfg.model, tokenizer), tokenizer, cfg, kind, rate, args.duration,
                        args.seed, args.every)
    if kind == "finetune":
        row["peak"] = peak_cell(make_cfg(tmp + "/peak", []), tokenizer, args.duration / 2)
    row.update(kind=kind, rate=rate, duration=args.duration, uptime_before=load,
               wall_s=round(time.perf_counter() - began, 1), tpot_slo_ms=slo_ms, every=args.every,
               threads=args.threads)
    results[args.cell] = row
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print(json.dumps({args.cell: {k: v for k, v in row.items() if k not in ("cost_model", "unit_costs")}}), flush=True)


def unit_seconds(cell: dict) -> float:
    """Seconds the cell's fine-tuning units (forward and backward) ran in the window."""
    return sum(cell.get("units", {}).get(kind, {}).get("seconds", 0.0) for kind in ("forward", "backward"))


def report(path: Path, plot: Path | None) -> None:
    results = json.loads(path.read_text())
    ft = results.get("finetune", {})
    base_ft, peak = ft.get("ft_tokens_per_s"), (ft.get("peak") or {}).get("ft_tokens_per_s")
    rates = sorted({r["rate"] for r in results.values() if r["kind"] != "finetune"})
    print(f"fine-tuning alone: engine {base_ft} tok/s, train_step {peak} tok/s")
    print("| rate (req/s) | cell | TPOT target (ms) | TPOT p50 (s) | TPOT p99 (s) | TTFT p50 (s) | out tok/s | FT tok/s "
          "| FT kept vs (b) | FT kept vs train_step | FT time vs (b) | TPOT p50 vs (a) | idle share of (a) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        inf = results.get(f"inference@{rate:g}", {})
        for kind in ("inference", "coserve", "timeshare", "generate"):
            r = results.get(f"{kind}@{rate:g}")
            if not r:
                continue
            trains = "ft_tokens_per_s" in r and kind != "inference"
            kept = f"{r['ft_tokens_per_s'] / base_ft:.2f}" if base_ft and trains else ""
            kept_peak = f"{r['ft_tokens_per_s'] / peak:.2f}" if peak and trains else ""
            # seconds the job's units ran, against the fine-tune-only cell's: what the schedule kept, free of the
            # machine's speed drift between cells (kept in tokens = this x the units' speed ratio)
            time_share = f"{unit_seconds(r) / unit_seconds(ft):.2f}" if trains and unit_seconds(r) and unit_seconds(ft) else ""
            vs = f"{r['tpot_p50'] / inf['tpot_p50']:.2f}" if inf.get("tpot_p50") and r.get("tpot_p50") else ""
            target = r["tpot_slo_ms"] if kind == "coserve" else ""
            # the window without a request in the engine, inference-only: the ceiling of fine-tuning between requests
            idle = f"{1 - r['busy_s'] / r['duration']:.2f}" if kind == "inference" and "busy_s" in r else ""
            print(f"| {rate:g} | {kind} | {target} | {r['tpot_p50']} | {r['tpot_p99']} | {r['ttft_p50']} | "
                  f"{r['output_tokens_per_s']} | {r['ft_tokens_per_s'] if trains else ''} | {kept} | {kept_peak} | {time_share} | {vs} "
                  f"| {idle} |")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for kind, style in (("inference", "o-"), ("coserve", "s-"), ("timeshare", "^-"), ("generate", "x--")):
            xs = [r for r in rates if f"{kind}@{r:g}" in results]
            if xs:
                ax1.plot(xs, [results[f"{kind}@{r:g}"]["tpot_p50"] for r in xs], style, label=f"{kind} p50")
                ax1.plot(xs, [results[f"{kind}@{r:g}"]["tpot_p99"] for r in xs], style, alpha=0.4, label=f"{kind} p99")
        xs = [r for r in rates if f"coserve@{r:g}" in results]
        ax1.plot(xs, [results[f"coserve@{r:g}"]["tpot_slo_ms"] / 1000 for r in xs], "k:", label="co-serving TPOT target")
        ax1.set_yscale("log"), ax1.set_xlabel("request rate (req/s)"), ax1.set_ylabel("TPOT (s)")
        ax1.legend(fontsize=7)
        for kind, style in (("coserve", "s-"), ("timeshare", "^-")):
            xs = [r for r in rates if f"{kind}@{r:g}" in results]
            ax2.plot(xs, [results[f"{kind}@{r:g}"]["ft_tokens_per_s"] for r in xs], style, label=kind)
        if base_ft:
            ax2.axhline(base_ft, color="gray", ls=":", label="fine-tuning alone (engine)")
        if peak:
            ax2.axhline(peak, color="black", ls="--", label="train_step alone")
        ax2.set_xlabel("request rate (req/s)"), ax2.set_ylabel("fine-tuning tokens/s"), ax2.legend(fontsize=7)
        fig.suptitle("SmolLM2-135M co-serving on a 2-core CPU")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.1,0.2,0.4", help="Poisson request rates (req/s)")
    p.add_argument("--duration", type=float, default=120, help="seconds of arrivals per cell")
    p.add_argument("--cells", default="finetune,inference,coserve,timeshare,generate")
    p.add_argument("--every", type=int, default=16, help="timeshare: a whole step every N iterations")
    p.add_argument("--tpot-slo-ms", type=float, default=200)
    p.add_argument("--slo-vs-inference", type=float, default=None,
                   help="co-serving cell: serving.tpot_slo_ms = this x the inference-only cell's TPOT p50 at "
                        "the same rate (the target a user sets from the latency they accept)")
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/coserving.json")
    p.add_argument("--redo", action="store_true", help="measure cells already in --out again")
    p.add_argument("--plot", help="print the table of this JSON file and plot it (no measuring)")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # set by run(): measure this one cell in this process
    args = p.parse_args()
    if args.plot:
        report(Path(args.plot), Path(args.plot).with_suffix(".png"))
    elif args.cell:
        measure_cell(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
