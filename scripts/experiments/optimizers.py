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
- Two disjoint slices of the held-out split, loss per assistant token: **test** (`eval_examples`
  conversations, reported, at step 0 and every `eval_every` steps) and **validation**
  (`val_examples`, picks the learning rate).
- Learning rates: every method has a grid of 3 rates (LR_GRID). Seed 0 runs each; where the best
  is at the grid's edge, one more rate beyond it (up to `--extend` times), so that the choice is
  bracketed; the lowest final validation loss picks the rate; the other seeds run at it.
  AdaHessian's rate is not in Adam's units (its step is gradient over curvature), so its grid is
  its own.
- "Equal steps": the test loss after the last step. "Equal wall time": each run's test loss at
  AdamW's median measured training time (seconds inside training steps, evaluation excluded),
  linear between evaluations. The step-time ratio c to AdamW is measured by these runs
  themselves, seed by seed; run the study with nothing else on the machine, or c measures the
  neighbours. scripts/bench_optim.py's ratios are printed beside it.
- Each run is its own process with one thread (OMP_NUM_THREADS=1); two run at a time.
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

from bracket import past_edge

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
    "lora_adahessian": ("lora", "AdaHessian i4", LORA, {"name": "adahessian", "lr": 1e-2, "hessian_interval": 4}),
}
BASELINE = {"full": "full_adamw", "lora": "lora_adamw"}
# learning-rate grids (seed 0, validation split): about x3 apart, centred on the earlier study's rates
LR_GRID = {"full_adamw": [1.5e-5, 5e-5, 1.5e-4], "full_galore": [1.5e-5, 5e-5, 1.5e-4],
           "full_natural_galore": [1.5e-5, 5e-5, 1.5e-4], "lora_adamw": [1e-3, 3e-3, 1e-2],
           "lora_adahessian": [3e-3, 1e-2, 3e-2]}
# step time / AdamW's step time, from scripts/bench_optim.py on a loaded machine (docs/results/optimizers.md);
# reported beside the ratio these runs measure themselves
COST = {"full_adamw": 1.0, "full_galore": 1.31, "full_natural_galore": 1.43, "lora_adamw": 1.0,
        "lora_adahessian": 1.35}
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
    # two disjoint slices of the held-out split: the test set reported, the validation set that picks lr
    held_out = eval_set[:spec["eval_examples"]]
    validation = eval_set[spec["eval_examples"]:spec["eval_examples"] + spec["val_examples"]]
    assert len(validation) == spec["val_examples"], f"held-out split has only {len(eval_set)} conversations"

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
    def loss_on(examples) -> float:
        total, count = 0.0, 0
        for i in range(0, len(examples), spec["eval_batch_size"]):
            s, n = _loss_sum(model, _collate(examples[i:i + spec["eval_batch_size"]], tokenizer.pad_token_id))
            total, count = total + float(s), count + n
        return total / count

    def evaluate() -> dict:
        model.eval()
        losses = {"loss": loss_on(held_out), "val_loss": loss_on(validation)}
        model.train()
        return losses

    model.train()
    evals = [{"step": 0, "time": 0.0, **evaluate()}]
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
            evals.append({"step": step + 1, "time": clock, **evaluate()})
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
    """Test loss at step (or training second) x, linear between evaluations."""
    pts = r["evals"]
    for a, b in zip(pts, pts[1:]):
        if a[key] <= x <= b[key]:
            return a["loss"] + (b["loss"] - a["loss"]) * (x - a[key]) / max(b[key] - a[key], 1e-9)
    return pts[-1]["loss"]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def best_lr(sweep: list[dict], method: str) -> float:
    """The grid's rate with the lowest final validation loss (a diverged run counts as infinite)."""
    runs = [r for r in sweep if r["method"] == method]
    score = lambda r: r["evals"][-1]["val_loss"] if math.isfinite(r["evals"][-1]["val_loss"]) else math.inf
    return min(runs, key=score)["lr"]


def beyond_edge(sweep: list[dict], method: str) -> float | None:
    """One more rate past the grid's edge when the best rate so far is the largest (or smallest) run,
    so that the chosen rate is bracketed; None when it already is."""
    losses = {r["lr"]: r["evals"][-1]["val_loss"] for r in sweep if r["method"] == method}
    scores = {lr: -loss if math.isfinite(loss) else -math.inf for lr, loss in losses.items()}
    return past_edge(scores, LR_GRID[method][1] / LR_GRID[method][0])


def mean_step_s(r: dict) -> float:
    """Training seconds per step over the whole run: a median step would hide AdaHessian's Hessian step
    (one in hessian_interval) and GaLore's SVD refresh."""
    return r["train_s"] / len(r["train"])


def step_cost(by: dict, method: str, baseline: str) -> list[float]:
    """Per seed: the method's mean measured s/step over the baseline's, same seed (both measured here)."""
    base = {r["seed"]: mean_step_s(r) for r in by[baseline]}
    return [mean_step_s(r) / base[r["seed"]] for r in sorted(by[method], key=lambda r: r["seed"])]


def report(results: list[dict], sweep: list[dict], args, wall_s: float, plot_name: str) -> str:
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    lines = [BEGIN, "", "## Experiment: test loss at equal steps and equal wall time", "",
             f"SmolLM2-135M-Instruct (packaged), chat SFT on packaged:chitchat: {args.steps} steps of batch "
             f"{args.batch_size} x max_length {args.max_length}, warm-up {args.warmup} then cosine, clip 1. Two "
             f"disjoint slices of the held-out split: **test** ({args.eval_examples} conversations) reported, "
             f"**validation** ({args.val_examples}) picks each method's lr; loss per assistant token, every "
             f"{args.eval_every} steps. Learning rates: seed 0 at each rate of the method's grid (and past its edge where "
             f"the best was at it), the lowest final validation loss wins; seeds {', '.join(map(str, [s for s in args.seeds if s != 0]))} at that rate. "
             "CPU, one thread per run, two runs at a time; "
             + (f"whole study {wall_s / 60:.0f} min." if wall_s > 60 else
                f"finished runs reused from {args.log_dir}."), "",
             "```", f"python scripts/experiments/optimizers.py {' '.join(args.argv)}".rstrip(), "```", ""]
    for comparison in ("full", "lora"):
        methods = [m for m in METHODS if METHODS[m][0] == comparison and m in by]
        if not methods:
            continue
        baseline = BASELINE[comparison]
        base = sorted(by[baseline], key=lambda r: r["seed"])
        budget = statistics.median(r["train_s"] for r in base)
        lines += [f"### {TITLE[comparison]}", "",
                  f"Test loss, mean ± std over seeds; Δ is taken against AdamW seed by seed (negative = better than "
                  f"AdamW). s/step: training seconds over steps (evaluation excluded). c: the method's s/step over "
                  f"AdamW's, seed by seed (median), from these runs' own clocks "
                  f"(c bench: scripts/bench_optim.py). Equal wall time: the test loss at AdamW's median training "
                  f"time ({budget:.0f} s of steps, evaluation excluded), linear between evaluations.", "",
                  "| method | lr (swept) | step 0 | equal steps | Δ vs AdamW | s/step, per seed | c | "
                  "equal wall time | Δ vs AdamW | c bench | optimizer state MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = sorted(by[m], key=lambda r: r["seed"])
            final = [r["evals"][-1]["loss"] for r in rs]
            timed = [loss_at(r, budget, "time") for r in rs]
            d_final = [a - b["evals"][-1]["loss"] for a, b in zip(final, base)]
            d_timed = [a - loss_at(b, budget, "time") for a, b in zip(timed, base)]
            is_base = m == baseline
            lines.append(
                f"| {METHODS[m][1]} | {rs[0]['lr']:g} | {mean_std([r['evals'][0]['loss'] for r in rs])} | "
                f"{mean_std(final)} | {'—' if is_base else mean_std(d_final)} | "
                f"{', '.join(format(mean_step_s(r), '.2f') for r in rs)} | "
                f"{statistics.median(step_cost(by, m, baseline)):.2f} | {mean_std(timed)} | "
                f"{'—' if is_base else mean_std(d_timed)} | {COST[m]:.2f} | {rs[0]['state_bytes'] / 2**20:.0f} |")
        lines.append("")
    if sweep:
        width = max(sum(1 for r in sweep if r["method"] == m) for m in METHODS)
        lines += ["### Learning-rate sweep (seed 0)", "",
                  "Final validation loss at each rate run (the grid, and rates past its edge where the best was at "
                  "it); **bold**: the rate the study used.", "",
                  "| method | " + " | ".join(f"rate {i + 1}" for i in range(width)) + " |", "|---|" + "---|" * width]
        for m in METHODS:
            runs = sorted((r for r in sweep if r["method"] == m), key=lambda r: r["lr"])
            if runs:
                chosen = best_lr(sweep, m)
                cells = [f"{'**' if r['lr'] == chosen else ''}{r['lr']:g}: {r['evals'][-1]['val_loss']:.4f}"
                         f"{'**' if r['lr'] == chosen else ''}" for r in runs]
                lines.append(f"| {METHODS[m][0]} {METHODS[m][1]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![test loss against steps and against measured training time]({plot_name})", "", END]
    return "\n".join(lines)


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
            n = min(len(r["evals"]) for r in rs)
            mean = [statistics.mean(r["evals"][i]["loss"] for r in rs) for i in range(n)]
            std = [statistics.stdev(r["evals"][i]["loss"] for r in rs) if len(rs) > 1 else 0 for i in range(n)]
            seconds = [statistics.mean(r["evals"][i]["time"] for r in rs) for i in range(n)]
            for ax, xs in ((axes[row][0], steps[:n]), (axes[row][1], seconds)):
                line, = ax.plot(xs, mean, marker="o", label=f"{METHODS[m][1]} (lr {rs[0]['lr']:g})")
                ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
        axes[row][0].set(title=TITLE[comparison], xlabel="step", ylabel="test loss (mean ± std over seeds)")
        axes[row][1].set(title="same, against measured training time", xlabel="seconds of training steps (mean)",
                         ylabel="test loss")
        axes[row][0].legend()
        axes[row][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results/optimizers.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seed 0 runs the lr sweep")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-examples", type=int, default=45, help="test conversations")
    p.add_argument("--val-examples", type=int, default=30, help="validation conversations (pick the lr)")
    p.add_argument("--max-examples", type=int, default=1000, help="training conversations rendered (the runs use "
                   "steps x batch_size of them)")
    p.add_argument("--extend", type=int, default=2, help="rounds of one more rate past the grid's edge where the "
                   "best rate is at it")
    p.add_argument("--only", choices=["full", "lora"], help="one comparison only")
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
    log_dir = ROOT / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "warmup": args.warmup,
            "eval_every": args.eval_every, "eval_examples": args.eval_examples, "val_examples": args.val_examples,
            "eval_batch_size": 8, "max_examples": args.max_examples}
    began = time.perf_counter()
    comparisons = [args.only] if args.only else ["full", "lora"]
    methods = [m for m in METHODS if METHODS[m][0] in comparisons]
    with ThreadPoolExecutor(args.parallel) as pool:
        # the grids interleaved rate by rate, so a long full fine-tune and a short LoRA run share the machine
        specs = [{**base, "method": m, "seed": 0, "lr": lr} for i in range(3) for m in methods
                 for lr in LR_GRID[m][i:i + 1]]
        sweep = list(pool.map(lambda s: run(s, log_dir), specs))
        for _ in range(args.extend):
            specs = [{**base, "method": m, "seed": 0, "lr": lr} for m in methods
                     if (lr := beyond_edge(sweep, m)) is not None]
            sweep += list(pool.map(lambda s: run(s, log_dir), specs))
        chosen = {m: best_lr(sweep, m) for m in methods}
        print("sweep picks " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), file=sys.stderr)
        specs = [{**base, "method": m, "seed": seed, "lr": chosen[m]} for seed in args.seeds if seed != 0
                 for m in methods]
        results = [r for r in sweep if r["lr"] == chosen[r["method"]]] + list(pool.map(lambda s: run(s, log_dir), specs))
    wall = time.perf_counter() - began
    out = ROOT / args.out
    plot_path = out.with_suffix(".png")
    plot(results, plot_path)
    section = report(results, sweep, args, wall, plot_path.name)
    text = out.read_text() if out.exists() else "# Research optimizers: results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
