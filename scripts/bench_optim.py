"""Step time, optimizer-state bytes and peak RSS of the research optimizers against AdamW on the
packaged SmolLM2-135M-Instruct (CPU).

    python scripts/bench_optim.py                 # both groups, 3 alternating repetitions
    python scripts/bench_optim.py --group full --reps 2 --json bench.json

Two groups, each against its own AdamW baseline:
  lora: LoRA r=8 (q/k/v/o, alpha 16) fine-tune: AdamW | AdaHessian hessian_interval 1 | 4
  full: full fine-tune:                          AdamW | GaLore rank 128 | Natural GaLore rank 128

Method (what the numbers mean):
- Every (method, repetition) is its own subprocess, so its peak RSS is its own. Within a
  repetition the methods of a group run back to back, in an order rotated every repetition, so
  load from other work on the machine hits all of them alike. Ratios are taken inside a
  repetition (method / the AdamW run next to it), then the median over repetitions is reported.
- One fixed batch of real chat data (packaged:chitchat, chat format), `batch_size` examples that
  all fill `max_length` tokens (no padding), so every step does identical work. A step is what the
  training loop does: forward, backward (create_graph when the optimizer asks), clip to norm 1,
  optimizer step, zero_grad. Times are medians over the steps after warm-up.
- AdaHessian interval 4: a Hessian step (create_graph + Hutchinson product) and three plain steps
  alternate; its step time is 1/4 * median(Hessian steps) + 3/4 * median(plain steps).
- GaLore / Natural GaLore: the projector SVDs run only every update_proj_gap steps. The median
  plain (projected) step is measured, then one refresh step is forced (step counter moved to a
  multiple of the gap) and timed on its own, with the seconds spent inside the SVDs. The
  amortised step is (refresh + (gap - 1) * plain) / gap for gap = 200.
- Natural GaLore: its per-step cost grows with the history until s gradients are kept; after
  warm-up the history count is set to s so the measured steps pay the steady-state s x s solve.
- Optimizer-state bytes: the sum of tensor bytes in optimizer.state after the steps (projectors,
  histories and the AdamW state of unprojected tensors included). Peak RSS: ru_maxrss of the
  worker process (weights, gradients, activations, state, SVD workspace).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
FULL = {"type": "none"}
RANK = 128
GAP = 200

# name -> (group, adapter options, optimizer options); the learning rates do not change the cost.
METHODS = {
    "adamw_lora": ("lora", LORA, {"name": "adamw", "lr": 1e-3}),
    "adahessian_i1": ("lora", LORA, {"name": "adahessian", "lr": 1e-3, "hessian_interval": 1}),
    "adahessian_i4": ("lora", LORA, {"name": "adahessian", "lr": 1e-3, "hessian_interval": 4}),
    "adamw_full": ("full", FULL, {"name": "adamw", "lr": 2e-5}),
    "galore": ("full", FULL, {"name": "galore_adamw", "lr": 2e-5, "rank": RANK, "scale": 0.25,
                              "update_proj_gap": GAP}),
    "natural_galore": ("full", FULL, {"name": "natural_galore", "lr": 2e-5, "rank": RANK, "scale": 0.25,
                                      "update_proj_gap": GAP, "natural_history": 4}),
    # the reference code's history length, for the honest memory/time overhead; first repetition only
    "natural_galore_s20": ("full", FULL, {"name": "natural_galore", "lr": 2e-5, "rank": RANK, "scale": 0.25,
                                          "update_proj_gap": GAP, "natural_history": 20}),
}
ONCE = {"natural_galore_s20"}
BASELINE = {"lora": "adamw_lora", "full": "adamw_full"}


# ---- worker: one method, one process ----------------------------------------------------------

def _fixed_batch(tokenizer, batch_size: int, max_length: int, seed: int):
    import torch

    from trainer.config import DataConfig
    from trainer.data import build_datasets
    data = DataConfig(path="packaged:chitchat", format="chat", max_length=max_length, eval_fraction=0.02,
                      max_examples=400)
    train, _ = build_datasets(data, tokenizer, "causal_lm", seed)
    full = [ex for ex in train if len(ex["input_ids"]) == max_length][:batch_size]
    if len(full) < batch_size:
        raise SystemExit(f"only {len(full)} examples fill max_length={max_length}; lower it")
    ids = torch.tensor([ex["input_ids"] for ex in full])
    labels = torch.tensor([ex["labels"] for ex in full])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _state_bytes(opt) -> dict:
    import torch
    parts = {"total": 0}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                n = value.numel() * value.element_size()
                parts["total"] += n
                parts[key] = parts.get(key, 0) + n
    return parts


def worker(args) -> dict:
    import torch

    import adapters
    import optim
    import optim.galore as galore_module
    from trainer.config import ModelConfig
    from trainer.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    group, adapter_opts, optim_opts = METHODS[args.worker]
    spec = optim.OPTIMIZERS[optim_opts["name"]]
    model_cfg = ModelConfig(name_or_path="packaged:smollm2-135m-instruct",
                            attn_implementation="eager" if spec.double_backward else None)  # as the loop does
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    adapter = adapters.ADAPTERS[adapter_opts["type"]]
    model, _ = adapter.build(model, adapter.options(**adapter_opts), adapters.BuildContext("causal_lm", 100, 0))
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = spec.build(named, spec.options(**optim_opts))
    batch = _fixed_batch(tokenizer, args.batch_size, args.max_length, 42)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    svd_seconds = [0.0]
    make_projector = galore_module.make_projector

    def timed_make_projector(*a, **k):
        began = time.perf_counter()
        try:
            return make_projector(*a, **k)
        finally:
            svd_seconds[0] += time.perf_counter() - began
    galore_module.make_projector = timed_make_projector

    def step() -> tuple[float, bool, float]:
        hessian = optim.wants_create_graph(opt)
        began = time.perf_counter()
        loss = model(**batch).loss
        loss.backward(create_graph=hessian)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        del loss  # do not carry a create_graph graph into the next step
        return time.perf_counter() - began, hessian, value

    interval = optim_opts.get("hessian_interval", 1)
    warmup = args.warmup
    # AdaHessian with an interval: whole cycles after the first (Hessian) warm-up step
    measured = math.ceil(args.steps / interval) * interval if interval > 1 else args.steps
    losses = [step()[2] for _ in range(warmup)]
    if optim_opts["name"] == "natural_galore":  # steady state: s gradients in every history
        for state in opt.state.values():
            if "history" in state:
                state["history_count"] = state["history"].shape[0]
    times = {"hessian": [], "plain": []}
    for _ in range(measured):
        seconds, hessian, value = step()
        times["hessian" if hessian and interval > 1 else "plain"].append(seconds)
        losses.append(value)
    result = {"method": args.worker, "group": group, "threads": args.threads, "batch_size": args.batch_size,
              "max_length": args.max_length, "tokens_per_step": args.batch_size * args.max_length,
              "trainable_params": sum(p.numel() for p in params), "step_s": times["plain"],
              "hessian_step_s": times["hessian"], "losses": losses}
    if "rank" in optim_opts and args.refresh:
        gap = optim_opts["update_proj_gap"]
        for state in opt.state.values():
            if "projector" in state:
                state["step"] = math.ceil(state["step"] / gap) * gap  # the next step rebuilds every projector
        svd_seconds[0] = 0.0
        seconds, _, value = step()
        result.update(refresh_step_s=seconds, svd_s=svd_seconds[0], losses=losses + [value])
    result["state_bytes"] = _state_bytes(opt)
    result["rss_loaded_mb"] = rss_loaded
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---- driver -------------------------------------------------------------------------------------

def run_worker(method: str, args, refresh: bool) -> dict:
    """One method in a fresh process; `refresh`: also time a forced projector-refresh (SVD) step."""
    cmd = [sys.executable, __file__, "--worker", method, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    cmd += ["--refresh"] if refresh else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"worker {method} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - began
    return result


def effective_step(r: dict, refresh_extra_s: float = 0.0) -> float:
    """Seconds per step in a long run: Hessian and plain steps in their proportion (AdaHessian),
    or the extra seconds of one SVD refresh step amortised over the projector gap (GaLore family;
    the refresh is timed in the first repetition only)."""
    plain = statistics.median(r["step_s"])
    if r["hessian_step_s"]:
        n = len(r["hessian_step_s"]) + len(r["step_s"])
        share = len(r["hessian_step_s"]) / n
        return share * statistics.median(r["hessian_step_s"]) + (1 - share) * plain
    return plain + refresh_extra_s / GAP


def summarise(runs: list[dict]) -> dict:
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method, rs in by_method.items():
        group = rs[0]["group"]
        base = by_method[BASELINE[group]]
        extra = rs[0]["refresh_step_s"] - statistics.median(rs[0]["step_s"]) if "refresh_step_s" in rs[0] else 0.0
        ratios = [effective_step(r, extra) / effective_step(b) for r, b in zip(rs, base)]
        entry = {
            "group": group,
            "step_s": statistics.median(effective_step(r, extra) for r in rs),
            "ratio_vs_adamw": statistics.median(ratios),
            "ratios_per_rep": ratios,
            "plain_step_s": statistics.median(statistics.median(r["step_s"]) for r in rs),
            "state_bytes": rs[0]["state_bytes"]["total"],
            "state_ratio_vs_adamw": rs[0]["state_bytes"]["total"] / base[0]["state_bytes"]["total"],
            "state_breakdown": rs[0]["state_bytes"],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "rss_loaded_mb": statistics.median(r["rss_loaded_mb"] for r in rs),
            "trainable_params": rs[0]["trainable_params"],
        }
        if rs[0]["hessian_step_s"]:
            entry["hessian_step_s"] = statistics.median(statistics.median(r["hessian_step_s"]) for r in rs)
        if "refresh_step_s" in rs[0]:
            entry["refresh_step_s"] = rs[0]["refresh_step_s"]
            entry["svd_s"] = rs[0]["svd_s"]
            entry["refresh_ratio_vs_adamw_step"] = rs[0]["refresh_step_s"] / effective_step(base[0])
        out[method] = entry
    return out


def table(summary: dict, args) -> str:
    lines = [f"SmolLM2-135M, CPU, {args.threads} threads, batch {args.batch_size} x {args.max_length} tokens, "
             f"median of {args.reps} alternating repetitions",
             "| method | group | s/step | x AdamW step | optimizer state MB | x AdamW state | peak RSS MB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for method, e in summary.items():
        notes = []
        if "hessian_step_s" in e:
            notes.append(f"Hessian step {e['hessian_step_s']:.2f}s, plain {e['plain_step_s']:.2f}s")
        if "refresh_step_s" in e:
            notes.append(f"plain {e['plain_step_s']:.2f}s; SVD refresh step {e['refresh_step_s']:.1f}s "
                         f"({e['refresh_ratio_vs_adamw_step']:.1f}x an AdamW step, {e['svd_s']:.1f}s in SVDs), "
                         f"amortised over gap {GAP}")
        lines.append(f"| {method} | {e['group']} | {e['step_s']:.3f} | {e['ratio_vs_adamw']:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in e['ratios_per_rep'])}) | {e['state_bytes'] / 2**20:.1f} | "
                     f"{e['state_ratio_vs_adamw']:.2f} | {e['peak_rss_mb']:.0f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", choices=["lora", "full", "all"], default="all")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (rounded up to whole Hessian cycles)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps, not timed")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: on a shared, oversubscribed CPU, OpenMP threads waiting at barriers "
                   "distort times far more than a single thread does")
    p.add_argument("--json", help="also write the raw runs and the summary here")
    p.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--refresh", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        print(json.dumps(worker(args)))
        return

    groups = ["lora", "full"] if args.group == "all" else [args.group]
    runs, began = [], time.perf_counter()
    for group in groups:
        methods = [m for m, (g, _, _) in METHODS.items() if g == group]
        for rep in range(args.reps):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]  # rotate the order
            for method in order:
                if method in ONCE and rep > 0:
                    continue
                r = run_worker(method, args, refresh=rep == 0)
                r["rep"] = rep
                runs.append(r)
                print(f"[{time.perf_counter() - began:6.0f}s] rep {rep} {method}: plain step "
                      f"{statistics.median(r['step_s']):.3f}s, Hessian step {r['hessian_step_s']}, "
                      f"refresh step {r.get('refresh_step_s')} (worker {r['wall_s']:.0f}s)", file=sys.stderr, flush=True)
    runs.sort(key=lambda r: (list(METHODS).index(r["method"]), r["rep"]))
    summary = summarise(runs)
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
              "summary": summary, "wall_s": time.perf_counter() - began}
    print(json.dumps(report, indent=1))
    print(table(summary, args))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
