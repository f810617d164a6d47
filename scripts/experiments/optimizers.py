"""Do the research optimizers help on the packaged real model? A small, CPU-sized study.

    python scripts/experiments/optimizers.py --out docs/results/optimizers.md

Two comparisons on SmolLM2-135M-Instruct (packaged), chat SFT on packaged:chitchat, 3 seeds each:
  full: full fine-tune, AdamW vs GaLore (rank 128) vs Natural GaLore (rank 128, history 4)
  lora: LoRA r=8 (q/k/v/o) fine-tune, AdamW vs AdaHessian (hessian_interval 4)

Protocol:
- Same data, schedule and budget for every method: `steps` updates of `batch_size` examples cut to
  `max_length` tokens, linear warm-up then cosine decay, gradient clipping at 1. The seed sets the
  data order, the LoRA initialisation, dropout and AdaHessian's probes; the held-out split does
  not depend on it.
- Held-out loss: token-weighted cross-entropy on the assistant tokens of a fixed subset of the
  held-out split (`eval_examples` conversations), at step 0 and every `eval_every` steps.
- "Equal steps": the held-out loss after the last step. "Equal wall time": the held-out loss of
  each run at the step where it has cost as much as AdamW's `steps` steps, i.e. at step
  steps / c with c the method's step-time ratio to AdamW from scripts/bench_optim.py (measured
  with alternating runs; `--bench-json` reads them from a bench output, the defaults are the
  ratios in docs/results/optimizers.md), linear between evaluations. The wall time measured in
  these runs is reported too, but on a shared machine it mostly measures the neighbours: two runs
  of the same method at the same settings differed by up to 2x.
- Learning rates. Full fine-tuning: one lr for all three, GaLore's scale set to 1, so a projected
  matrix takes Adam-sized steps inside its subspace and only the optimizer differs. LoRA: AdamW
  uses the repository's LoRA demo lr (1e-3). AdaHessian's lr is not in Adam's units (its step is
  gradient over curvature), so it is chosen by a pilot: `--pilot-lrs`, one seed not among the
  reported ones, `pilot_steps` steps, the best held-out loss wins. The pilot is reported too.
- Each run is its own process with one thread (OMP_NUM_THREADS=1); two run at a time, methods
  interleaved seed by seed so load from other work on the machine is shared among methods.
Results go between the experiment markers of `--out` (the rest of the file is kept), with a plot
next to it (same name, .png).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- BEGIN experiment (scripts/experiments/optimizers.py) -->", "<!-- END experiment -->"

LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
FULL = {"type": "none"}
FULL_LR = 5e-5
GALORE = {"rank": 128, "scale": 1.0, "update_proj_gap": 200, "proj_type": "std"}

# name -> (comparison, label, adapter options, optimizer options without lr for AdaHessian)
METHODS = {
    "full_adamw": ("full", "AdamW", FULL, {"name": "adamw", "lr": FULL_LR}),
    "full_galore": ("full", "GaLore r128", FULL, {"name": "galore_adamw", "lr": FULL_LR, **GALORE}),
    "full_natural_galore": ("full", "Natural GaLore r128 s4", FULL,
                            {"name": "natural_galore", "lr": FULL_LR, **GALORE, "natural_history": 4}),
    "lora_adamw": ("lora", "AdamW", LORA, {"name": "adamw", "lr": 1e-3}),
    "lora_adahessian": ("lora", "AdaHessian i4", LORA, {"name": "adahessian", "hessian_interval": 4}),
}
BASELINE = {"full": "full_adamw", "lora": "lora_adamw"}
# step time / AdamW's step time, from scripts/bench_optim.py (docs/results/optimizers.md)
COST = {"full_adamw": 1.0, "full_galore": 1.31, "full_natural_galore": 1.43, "lora_adamw": 1.0,
        "lora_adahessian": 1.35}
BENCH_KEYS = {"full_galore": "galore", "full_natural_galore": "natural_galore", "lora_adahessian": "adahessian_i4"}
TITLE = {"full": "Full fine-tune: AdamW vs GaLore vs Natural GaLore",
         "lora": "LoRA r=8 fine-tune: AdamW vs AdaHessian"}


# ---- worker: one run ----------------------------------------------------------------------------

def _collate(examples, pad_id: int):
    import torch
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_sum(model, batch):
    """(sum of next-token cross-entropy over label tokens, their count)."""
    import torch.nn.functional as F
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, int((target != -100).sum())


def worker(spec: dict) -> dict:
    import random

    import torch

    import adapters
    import optim
    from trainer.config import DataConfig, ModelConfig
    from trainer.data import build_datasets
    from trainer.models import load_model, load_tokenizer
    from trainer.schedule import lr_factor

    torch.set_num_threads(1)
    _, _, adapter_opts, optim_opts = METHODS[spec["method"]]
    optim_opts = {**optim_opts, **({"lr": spec["lr"]} if spec.get("lr") else {})}
    if optim_opts["name"] == "adahessian":
        optim_opts["seed"] = spec["seed"]
    ospec = optim.OPTIMIZERS[optim_opts["name"]]
    model_cfg = ModelConfig(name_or_path="packaged:smollm2-135m-instruct",
                            attn_implementation="eager" if ospec.double_backward else None)  # as the loop does
    tokenizer = load_tokenizer(model_cfg)
    data = DataConfig(path="packaged:chitchat", format="chat", max_length=spec["max_length"], eval_fraction=0.02,
                      max_examples=spec["max_examples"])
    train_set, eval_set = build_datasets(data, tokenizer, "causal_lm", 42)  # split fixed, not the run seed
    held_out = eval_set[:spec["eval_examples"]]

    torch.manual_seed(spec["seed"])
    random.seed(spec["seed"])
    model = load_model(model_cfg, tokenizer)
    adapter = adapters.ADAPTERS[adapter_opts["type"]]
    model, _ = adapter.build(model, adapter.options(**adapter_opts),
                             adapters.BuildContext("causal_lm", spec["steps"], spec["seed"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = ospec.build(named, ospec.options(**optim_opts))
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    batch_size = spec["batch_size"]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(held_out), spec["eval_batch_size"]):
            s, n = _loss_sum(model, _collate(held_out[i:i + spec["eval_batch_size"]], tokenizer.pad_token_id))
            total, count = total + float(s), count + n
        model.train()
        return total / count

    model.train()
    evals = [{"step": 0, "time": 0.0, "loss": evaluate()}]
    train, clock = [], 0.0
    for step in range(spec["steps"]):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, spec["steps"], spec["warmup"], "cosine")
        start = (step * batch_size) % len(order)
        batch = _collate([train_set[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id)
        began = time.perf_counter()
        hessian = optim.wants_create_graph(opt)
        loss_sum, count = _loss_sum(model, batch)
        loss = loss_sum / max(count, 1)
        loss.backward(create_graph=hessian)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        del loss, loss_sum  # no create_graph graph carried into the next step
        clock += time.perf_counter() - began
        train.append({"step": step + 1, "time": clock, "loss": value})
        if not math.isfinite(value):
            break
        if (step + 1) % spec["eval_every"] == 0 or step + 1 == spec["steps"]:
            evals.append({"step": step + 1, "time": clock, "loss": evaluate()})
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    return {**spec, "lr": optim_opts["lr"], "evals": evals, "train": train, "train_s": clock,
            "step_s_median": statistics.median(b["time"] - a["time"] for a, b in zip([{"time": 0.0}] + train, train)),
            "state_bytes": state_bytes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": sum(p.numel() for p in params)}


# ---- driver -------------------------------------------------------------------------------------

def run(spec: dict, log_dir: Path) -> dict:
    tag = f"{spec['method']}-s{spec['seed']}" + (f"-lr{spec['lr']:g}" if spec.get("lr") else "")
    out = log_dir / f"{tag}.json"
    if out.exists():  # a finished run is reused when the script is re-run with the same settings
        done = json.loads(out.read_text())
        if all(done.get(k) == v for k, v in spec.items() if k != "lr"):
            return done
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"run {tag} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out.write_text(json.dumps(result))
    print(f"  {tag}: final held-out {result['evals'][-1]['loss']:.4f}, {result['step_s_median']:.2f} s/step, "
          f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return result


def loss_at(r: dict, x: float, key: str = "step") -> float:
    """Held-out loss at step (or training second) x, linear between evaluations."""
    pts = r["evals"]
    for a, b in zip(pts, pts[1:]):
        if a[key] <= x <= b[key]:
            return a["loss"] + (b["loss"] - a["loss"]) * (x - a[key]) / max(b[key] - a[key], 1e-9)
    return pts[-1]["loss"]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def report(results: list[dict], pilot: list[dict], args, wall_s: float, plot_name: str) -> str:
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    lines = [BEGIN, "", "## Experiment: held-out loss at equal steps and equal wall time", "",
             f"SmolLM2-135M-Instruct (packaged), chat SFT on packaged:chitchat: {args.steps} steps of batch "
             f"{args.batch_size} x max_length {args.max_length}, warm-up {args.warmup} then cosine, clip 1; held-out "
             f"loss on a fixed {args.eval_examples}-conversation held-out subset (assistant tokens) every "
             f"{args.eval_every} steps; seeds {', '.join(map(str, args.seeds))}; CPU, one thread per run, two runs at a "
             f"time on a shared 2-core machine; "
             + (f"whole study {wall_s / 60:.0f} min." if wall_s > 60 else
                f"finished runs reused from {args.log_dir} (see the note above for the time they took)."), "",
             "```", f"python scripts/experiments/optimizers.py {' '.join(args.argv)}".rstrip(), "```", ""]
    for comparison in ("full", "lora"):
        methods = [m for m in METHODS if METHODS[m][0] == comparison and m in by]
        if not methods:
            continue
        base = sorted(by[BASELINE[comparison]], key=lambda r: r["seed"])
        budget = statistics.median(r["train_s"] for r in base)
        lines += [f"### {TITLE[comparison]}", "",
                  f"Held-out loss, mean ± std over seeds; Δ is taken against AdamW seed by seed (negative = better "
                  f"than AdamW). Equal wall time: the loss at step {args.steps} / c, where c is the step-time ratio "
                  f"to AdamW from the benchmark. Measured: the loss at AdamW's median measured training time "
                  f"({budget:.0f} s), from these runs' own clocks, which the machine's load made unreliable.", "",
                  "| method | lr | step 0 | equal steps | Δ vs AdamW | c | equal wall time (at step) | Δ vs AdamW | "
                  "measured s/step, per seed | at AdamW's measured time | optimizer state MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = sorted(by[m], key=lambda r: r["seed"])
            cost = args.cost[m]
            final = [r["evals"][-1]["loss"] for r in rs]
            timed = [loss_at(r, args.steps / cost) for r in rs]
            measured = [loss_at(r, budget, "time") for r in rs]
            d_final = [a - b["evals"][-1]["loss"] for a, b in zip(final, base)]
            d_timed = [a - b["evals"][-1]["loss"] for a, b in zip(timed, base)]
            is_base = m == BASELINE[comparison]
            lines.append(
                f"| {METHODS[m][1]} | {rs[0]['lr']:g} | {mean_std([r['evals'][0]['loss'] for r in rs])} | "
                f"{mean_std(final)} | {'—' if is_base else mean_std(d_final)} | {cost:.2f} | {mean_std(timed)} "
                f"({args.steps / cost:.1f}) | {'—' if is_base else mean_std(d_timed)} | "
                f"{', '.join(format(r['step_s_median'], '.1f') for r in rs)} | {mean_std(measured)} | "
                f"{rs[0]['state_bytes'] / 2**20:.0f} |")
        lines.append("")
    if pilot:
        lines += ["### AdaHessian learning-rate pilot", "",
                  f"Seed {args.pilot_seed} (not a reported seed), {args.pilot_steps} steps, otherwise as above; the "
                  "lowest held-out loss after the pilot picks the lr of the study.", "",
                  "| lr | held-out loss after the pilot | train loss, last step |", "|---|---|---|"]
        for r in sorted(pilot, key=lambda r: r["lr"]):
            lines.append(f"| {r['lr']:g} | {r['evals'][-1]['loss']:.4f} | {r['train'][-1]['loss']:.4f} |")
        lines.append("")
    lines += [f"![held-out loss against steps and against cost (step x benchmark ratio)]({plot_name})", "", END]
    return "\n".join(lines)


COST_USED: dict[str, float] = dict(COST)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, comparison in enumerate(("full", "lora")):
        for m in [m for m in METHODS if METHODS[m][0] == comparison]:
            rs = [r for r in results if r["method"] == m]
            if not rs:
                continue
            steps = [e["step"] for e in rs[0]["evals"]]
            mean = [statistics.mean(r["evals"][i]["loss"] for r in rs) for i in range(len(steps))]
            std = [statistics.stdev(r["evals"][i]["loss"] for r in rs) if len(rs) > 1 else 0 for i in range(len(steps))]
            line, = axes[row][0].plot(steps, mean, marker="o", label=METHODS[m][1])
            axes[row][0].fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                      color=line.get_color(), alpha=0.2)
            cost = COST_USED[m]
            axes[row][1].plot([x * cost for x in steps], mean, marker="o", color=line.get_color(),
                              label=f"{METHODS[m][1]} (c={cost:.2f})")
            axes[row][1].fill_between([x * cost for x in steps], [a - b for a, b in zip(mean, std)],
                                      [a + b for a, b in zip(mean, std)], color=line.get_color(), alpha=0.2)
        axes[row][0].set(title=TITLE[comparison], xlabel="step", ylabel="held-out loss (mean ± std, 3 seeds)")
        axes[row][1].set(title="same, against cost (benchmark step-time ratio c)",
                         xlabel="AdamW-step equivalents of wall time (step × c)", ylabel="held-out loss")
        axes[row][0].legend()
        axes[row][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/optimizers.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--max-examples", type=int, default=1000, help="training conversations rendered (the runs use "
                   "steps x batch_size of them)")
    p.add_argument("--pilot-lrs", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--pilot-steps", type=int, default=10)
    p.add_argument("--pilot-seed", type=int, default=100)
    p.add_argument("--only", choices=["full", "lora"], help="one comparison only")
    p.add_argument("--bench-json", help="scripts/bench_optim.py --json output: take the step-time ratios from it")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--log-dir", default="runs/experiments/optimizers", help="one JSON per run (reused on re-runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.argv = sys.argv[1:]
    args.cost = dict(COST)
    if args.bench_json:
        summary = json.loads(Path(args.bench_json).read_text())["summary"]
        args.cost.update({m: summary[k]["ratio_vs_adamw"] for m, k in BENCH_KEYS.items() if k in summary})
    COST_USED.update(args.cost)
    log_dir = ROOT / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "warmup": args.warmup,
            "eval_every": args.eval_every, "eval_examples": args.eval_examples, "eval_batch_size": 8,
            "max_examples": args.max_examples}
    began = time.perf_counter()
    comparisons = [args.only] if args.only else ["full", "lora"]
    pilot, ah_lr = [], None
    with ThreadPoolExecutor(args.parallel) as pool:
        if "lora" in comparisons and args.pilot_lrs:
            print("pilot: AdaHessian lr", file=sys.stderr)
            specs = [{**base, "steps": args.pilot_steps, "eval_every": args.pilot_steps, "method": "lora_adahessian",
                      "seed": args.pilot_seed, "lr": lr} for lr in args.pilot_lrs]
            pilot = list(pool.map(lambda s: run(s, log_dir), specs))
            ah_lr = min(pilot, key=lambda r: r["evals"][-1]["loss"])["lr"]
            print(f"pilot picks lr {ah_lr:g}", file=sys.stderr)
        specs = [{**base, "method": m, "seed": seed, **({"lr": ah_lr} if m == "lora_adahessian" and ah_lr else {})}
                 for seed in args.seeds for m in METHODS if METHODS[m][0] in comparisons]
        results = list(pool.map(lambda s: run(s, log_dir), specs))
    wall = time.perf_counter() - began
    out = ROOT / args.out
    plot_path = out.with_suffix(".png")
    plot(results, plot_path)
    section = report(results, pilot, args, wall, plot_path.name)
    text = out.read_text() if out.exists() else "# Research optimizers: results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
