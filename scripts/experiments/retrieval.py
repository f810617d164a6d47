#!/usr/bin/env python
"""MiniLM dense retrieval: IAA against LoRA, bottleneck adapters, prefix tuning, BitFit and full
fine-tuning at about equal trainable-parameter budgets, on chatterbot Q&A (question -> answer)
and BYU chit-chat (turn -> next turn), several seeds.

Every run goes through the real trainer (trainer.cli.main, in this process, so imports and data
load once): the packaged all-MiniLM-L6-v2 bi-encoder, InfoNCE with in-batch negatives, MRR@10
and Recall@k against every held-out passage. The held-out split is fixed once per dataset
(written under --workdir) so seeds change only the adapter initialisation and the data order,
and one zero-shot evaluation per dataset gives the starting point.

  OMP_NUM_THREADS=1 python scripts/experiments/retrieval.py --out docs/results/retrieval.md

With `--sweep 0.333,1,3` each method's learning rate is picked first: 15 % of the training pairs
(seeded) become a validation split and leave training for every run; seed 0 trains at the method's
rate times each factor (and one more rate past the edge where the best is at it, up to `--extend`
times) and is scored on validation; the best final MRR@10 picks the rate, and then
every seed trains at it and is scored on the held-out (test) split, which the sweep never sees.

prints one JSON line per run, writes all runs to <out>.json and the tables to <out> (a section
after the line `<!-- reading -->` in an existing <out> is kept, so a written reading survives
a rerun).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from bracket import past_edge
from run_metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

READING_MARK = "<!-- reading -->"
MODEL = "packaged:all-minilm-l6-v2"

# Held-out split per dataset. Chatterbot: a seeded random 15 % (a question may keep other answers
# in training, as an FAQ would). Chit-chat rows chain turn to turn in file order, so the held-out
# rows are one contiguous block at the end (whole conversations, no neighbour turns in training).
DATASETS = {
    "chatterbot": {"source": "chatterbot_qa_pairs", "eval": ("random", 0.15), "train_rows": None},
    "chitchat": {"source": "chitchat_next_turn", "eval": ("tail", 400), "train_rows": 5000},
}

# Method -> (adapter overrides, learning rate). Budgets: ~75k trainable parameters (0.3 % of 22.7M)
# except BitFit (all biases, ~26k) and full fine-tuning (everything).
METHODS = {
    # IAA = Houlsby-placed inside modules of width 4 + aside modules of width 4; `bottleneck` is the same
    # placement at width 8 with no pathway: the scattered counterpart at the same budget
    "iaa": (["adapter.type=iaa", "adapter.r=4", "adapter.aside_r=4", "adapter.pathway=chain"], 2e-3),
    "lora": (["adapter.type=lora", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0",
              "adapter.target_modules=[query,value]"], 2e-3),
    "bottleneck": (["adapter.type=bottleneck", "adapter.r=8"], 2e-3),
    "prefix": (["adapter.type=prefix", "adapter.num_virtual_tokens=16"], 1e-2),
    "bitfit": (["adapter.type=bitfit"], 2e-3),
    "full": (["adapter.type=none"], 5e-5),
}


def common_overrides(steps: int, eval_every: int, batch_size: int, max_length: int) -> list[str]:
    return [f"model.name_or_path={MODEL}", "model.task=retrieval", "model.temperature=0.05", "data.format=pairs",
            f"data.max_length={max_length}", "optim.name=adamw", "optim.weight_decay=0", f"train.batch_size={batch_size}",
            f"train.max_steps={steps}", f"train.eval_every={eval_every}", "train.lr_schedule=constant",
            "train.warmup_steps=3", "train.log_every=1", "train.overwrite=true", "tracking.wandb=false"]


def write_split(name: str, workdir: Path) -> tuple[Path, Path]:
    """Fixed train/eval jsonl files of a dataset (written once)."""
    from trainer.data import packaged

    spec = DATASETS[name]
    train_path, eval_path = workdir / f"{name}-train.jsonl", workdir / f"{name}-eval.jsonl"
    if train_path.exists() and eval_path.exists():
        return train_path, eval_path
    rows = packaged.load(spec["source"], "data.path")
    kind, amount = spec["eval"]
    if kind == "random":
        held = set(random.Random(1234).sample(range(len(rows)), round(amount * len(rows))))
        train = [r for i, r in enumerate(rows) if i not in held]
        evaluation = [r for i, r in enumerate(rows) if i in held]
    else:
        train, evaluation = rows[:-amount], rows[-amount:]
        # the block boundary may split one conversation: drop training rows that share a text with it
        texts = {r["query"] for r in evaluation} | {r["passage"] for r in evaluation}
        train = [r for r in train if r["query"] not in texts and r["passage"] not in texts]
    if spec["train_rows"]:
        train = train[:spec["train_rows"]]
    workdir.mkdir(parents=True, exist_ok=True)
    for path, part in ((train_path, train), (eval_path, evaluation)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return train_path, eval_path


def carve_validation(train_path: Path, fraction: float = 0.15) -> tuple[Path, Path]:
    """Split a training file into (what every run trains on, the sweep's validation split), once."""
    rest, val = train_path.with_name(train_path.stem + "-minus-val.jsonl"), train_path.with_name(
        train_path.stem.replace("-train", "-val") + ".jsonl")
    if rest.exists() and val.exists():
        return rest, val
    rows = train_path.read_text().splitlines()
    held = set(random.Random(4321).sample(range(len(rows)), round(fraction * len(rows))))
    # the same query may have several answers: keep all of a validation query's pairs out of training
    queries = {json.loads(rows[i])["query"] for i in held}
    rest.write_text("".join(r + "\n" for i, r in enumerate(rows) if json.loads(r)["query"] not in queries))
    val.write_text("".join(r + "\n" for i, r in enumerate(rows) if i in held))
    return rest, val


def run(overrides: list[str]) -> int:
    """trainer.cli.main in this process, with accelerate's singletons reset between runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from trainer.cli import main
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return main(overrides)


def run_once(overrides: list[str], out: Path) -> None:
    """Train into `out` unless a finished run with the same overrides is already there: two
    processes can split the methods between them, and a third, given all methods, reuses their runs
    and writes the tables."""
    overrides = [*overrides, f"train.output_dir={out}"]
    done = out / "overrides.json"
    if done.exists() and json.loads(done.read_text()) == overrides:
        return
    assert run(overrides) == 0
    done.write_text(json.dumps(overrides))


def trainable_parameters(method: str) -> int:
    """Count by building the method on the model exactly as the trainer does."""
    import adapters
    from trainer.config import load_config
    from trainer.models import load_model, load_tokenizer

    cfg = load_config(None, common_overrides(1, 0, 1, 8) + METHODS[method][0] + ["data.path=packaged:chatterbot_qa_pairs"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    wrapped, _ = adapters.ADAPTERS[cfg.adapter.type].build(model, cfg.adapter, adapters.BuildContext("retrieval", 1, 0))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def summarise(rows: list[dict], threshold: float, batch_size: int) -> dict:
    evals = [r for r in rows if "eval/mrr@10" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    reached = next((r["step"] for r in evals if r["eval/mrr@10"] >= threshold), None)
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # step 1 pays one-off warm-up
    half = losses[len(losses) // 2:]
    return {
        "curve": {r["step"]: r["eval/mrr@10"] for r in evals},
        "mrr@10": evals[-1]["eval/mrr@10"], "recall@1": evals[-1]["eval/recall@1"],
        "recall@5": evals[-1]["eval/recall@5"], "recall@10": evals[-1]["eval/recall@10"],
        "steps_to_threshold": reached,
        "loss_std_second_half": statistics.pstdev(half) if len(half) > 1 else 0.0,
        "final_loss": losses[-1],
        "s_per_step": batch_size / statistics.median(speeds) if speeds else None,
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def sweep_table(sweep: list[dict], chosen: dict) -> list[str]:
    rates = max(len([r for r in sweep if r["method"] == m and r["dataset"] == d]) for m, d in chosen)
    out = ["", "## Learning-rate sweep (seed 0, validation split)", "",
           "Final MRR@10 on the validation split at each rate; **bold**: the rate every seed then used.", "",
           "| dataset | method | " + " | ".join(f"rate {i + 1}" for i in range(rates)) + " |",
           "|---|---|" + "---|" * rates]
    for (m, d), lr in chosen.items():
        runs = sorted((r for r in sweep if r["method"] == m and r["dataset"] == d), key=lambda r: r["lr"])
        cells = [f"**{r['lr']:.2g}: {r['mrr@10']:.3f}**" if r["lr"] == lr else f"{r['lr']:.2g}: {r['mrr@10']:.3f}"
                 for r in runs]
        out.append(f"| {d} | {m} | " + " | ".join(cells) + " |")
    return out


def tables(results: list[dict], zero_shot: dict, params: dict, args, command: str) -> str:
    out = ["# MiniLM retrieval: IAA vs LoRA, bottleneck, prefix, BitFit, full fine-tuning", "",
           "Generated by `scripts/experiments/retrieval.py`; exact command:", "", "```", command, "```", "",
           f"Model `{MODEL}` (bi-encoder, mean pooling, cosine), InfoNCE with in-batch negatives, "
           f"temperature 0.05, batch {args.batch_size} queries, max_length {args.max_length}, "
           f"{args.steps} steps, constant LR after 3 warm-up steps, AdamW (no weight decay), "
           f"evaluation every {args.eval_every} steps. Seeds: {args.seeds} (adapter init and data order; the held-out "
           "split is fixed per dataset). MRR@10 and Recall@k rank every query against **all** distinct held-out "
           "passages. Mean ± standard deviation over seeds.", ""]
    out += ["## Trainable parameters and learning rates", "", "| method | trainable | % of 22.7M | LR |", "|---|---:|---:|---:|"]
    total = params.get("full")
    for m in args.methods:
        share = f"{100 * params[m] / total:.2f}" if total else "-"
        out.append(f"| {m} | {params[m]:,} | {share} | {METHODS[m][1]:.2g} |")
    for ds in args.datasets:
        rows = [r for r in results if r["dataset"] == ds]
        if not rows:
            continue
        zs = zero_shot[ds]
        out += ["", f"## {ds}: {rows[0]['train_rows']} training pairs, {zs['pool']} held-out passages, "
                f"{zs['queries']} queries", "",
                f"Zero-shot (no training): MRR@10 {zs['eval/mrr@10']:.3f}, R@1 {zs['eval/recall@1']:.3f}, "
                f"R@10 {zs['eval/recall@10']:.3f}. Threshold for 'steps to reach': MRR@10 ≥ {zs['threshold']:.3f} "
                f"(zero-shot + {args.margin}).", "",
                "| method | MRR@10 | R@1 | R@5 | R@10 | MRR@10 by step | steps to threshold | loss std, 2nd half | s/step |",
                "|---|---|---|---|---|---|---|---|---|"]
        for m in args.methods:
            mr = [r for r in rows if r["method"] == m]
            if not mr:
                continue
            steps = sorted(mr[0]["curve"])
            curve = " / ".join(f"{statistics.mean(r['curve'][s] for r in mr):.3f}" for s in steps)
            reached = [r["steps_to_threshold"] for r in mr]
            reach = ", ".join("never" if s is None else str(s) for s in reached)
            times = [r["s_per_step"] for r in mr if r["s_per_step"]]
            out.append(f"| {m} | {mean_std([r['mrr@10'] for r in mr])} | {mean_std([r['recall@1'] for r in mr])} | "
                       f"{mean_std([r['recall@5'] for r in mr])} | {mean_std([r['recall@10'] for r in mr])} | {curve} | "
                       f"{reach} | {mean_std([r['loss_std_second_half'] for r in mr])} | "
                       f"{statistics.median(times):.2f} |")
    return "\n".join(out) + "\n"


def sweep_rates(method: str, ds: str, overrides: list[str], lr: float, args, common: list[str], workdir: Path,
                threshold: float) -> list[dict]:
    """Seed 0 at lr times each --sweep factor, scored on the validation split that `common` points at; then
    one more rate past the edge while the best is at it (at most --extend times), so the choice is bracketed."""
    factors = sorted(float(f) for f in args.sweep.split(","))
    step = factors[-1] / factors[-2] if len(factors) > 1 else 3.0
    rates, rows = [float(f"{lr * f:.2g}") for f in factors], []
    while rates:
        for rate in rates:
            out = workdir / "runs" / f"{ds}-{method}-lr{rate:g}-val"
            run_once([*common, *overrides, f"optim.lr={rate}", "train.seed=0"], out)
            row = {"dataset": ds, "method": method, "seed": 0, "lr": rate, "split": "validation",
                   **summarise(read_metrics(out), threshold, args.batch_size)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        beyond = past_edge({r["lr"]: r["mrr@10"] for r in rows}, step)
        rates = [beyond] if beyond is not None and len(rows) < len(factors) + args.extend else []
    return rows


def plot_curves(results: list[dict], zero_shot: dict, path: Path) -> None:
    """Held-out MRR@10 against training steps, mean over seeds with the seeds' range, one panel per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for m in dict.fromkeys(r["method"] for r in results if r["dataset"] == ds):
            # steps are int keys in memory, str keys once the runs went through JSON
            curves = [{int(k): v for k, v in r["curve"].items()} for r in results
                      if r["dataset"] == ds and r["method"] == m]
            steps = sorted({s for c in curves for s in c})
            per_step = [[c[s] for c in curves if s in c] for s in steps]
            line, = ax.plot(steps, [statistics.mean(v) for v in per_step], marker=".", label=m)
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                            alpha=0.12)
        ax.axhline(zero_shot[ds]["eval/mrr@10"], color="gray", ls=":", label="zero-shot")
        ax.set_title(ds), ax.set_xlabel("training step"), ax.set_ylabel("held-out MRR@10 (mean, range over seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--margin", type=float, default=0.05, help="steps-to-threshold: zero-shot MRR@10 + margin")
    p.add_argument("--lr", action="append", default=[], help="METHOD=LR, overrides the table above")
    p.add_argument("--sweep", default=None, help="factors on each method's LR (e.g. 0.333,1,3): pick the rate on "
                   "a validation split carved from training, seed 0, then run every seed at it")
    p.add_argument("--extend", type=int, default=2, help="with --sweep: rates past the grid's edge where the best is "
                   "at it, at most this many")
    p.add_argument("--workdir", default="/tmp/peftforge-retrieval")
    p.add_argument("--out", default=None, help="markdown file for the tables (and <out>.json)")
    args = p.parse_args()
    command = "OMP_NUM_THREADS=1 python scripts/experiments/retrieval.py " + " ".join(sys.argv[1:])
    args.datasets, args.methods = args.datasets.split(","), args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for item in args.lr:
        method, value = item.split("=")
        METHODS[method] = (METHODS[method][0], float(value))
    workdir = Path(args.workdir)
    started = time.perf_counter()

    params = {m: trainable_parameters(m) for m in dict.fromkeys(args.methods + ["full"])}
    common = common_overrides(args.steps, args.eval_every, args.batch_size, args.max_length)
    results, zero_shot, sweep, chosen = [], {}, [], {}
    base = dict(METHODS)  # each dataset's sweep starts from the table's rates
    for ds in args.datasets:
        train_path, eval_path = write_split(ds, workdir)
        if args.sweep:
            train_path, val_path = carve_validation(train_path)
        data = [f"data.path={train_path}", f"data.eval_path={eval_path}"]
        n_train = sum(1 for _ in train_path.open())
        evaluation = [json.loads(line) for line in eval_path.open()]
        zs_dir = workdir / "runs" / f"{ds}-zero-shot"
        # one step at a vanishing LR: the evaluation is the untouched model's (LoRA starts as identity)
        assert run([*common, *data, *METHODS["lora"][0], "optim.lr=1e-12", "train.max_steps=1",
                    "train.eval_every=0", f"train.output_dir={zs_dir}"]) == 0
        zs = read_metrics(zs_dir)[-1]
        zs.update(pool=len({r["passage"] for r in evaluation}), queries=len({r["query"] for r in evaluation}),
                  threshold=round(zs["eval/mrr@10"] + args.margin, 3))
        zero_shot[ds] = zs
        print(json.dumps({"dataset": ds, "zero_shot": zs}), flush=True)
        if args.sweep:
            for m in args.methods:
                overrides, lr = base[m]
                mine = sweep_rates(m, ds, overrides, lr, args, [*common, f"data.path={train_path}",
                                   f"data.eval_path={val_path}"], workdir, zs["threshold"])
                sweep += mine
                best = max(mine, key=lambda r: r["mrr@10"])
                chosen[(m, ds)] = best["lr"]
                METHODS[m] = (overrides, best["lr"])
        for seed in args.seeds:
            for m in args.methods:
                overrides, lr = METHODS[m]
                out = workdir / "runs" / f"{ds}-{m}-s{seed}"
                began = time.perf_counter()
                run_once([*common, *data, *overrides, f"optim.lr={lr}", f"train.seed={seed}"], out)
                row = {"dataset": ds, "method": m, "seed": seed, "lr": lr, "params": params[m], "train_rows": n_train,
                       "wall_s": round(time.perf_counter() - began, 1),
                       **summarise(read_metrics(out), zs["threshold"], args.batch_size)}
                results.append(row)
                print(json.dumps(row), flush=True)

    print(json.dumps({"total_wall_min": round((time.perf_counter() - started) / 60, 1)}), flush=True)
    if args.out:
        out = Path(args.out)
        reading = ""
        if out.exists() and READING_MARK in out.read_text():
            reading = out.read_text().split(READING_MARK, 1)[1]
        out.parent.mkdir(parents=True, exist_ok=True)
        text = tables(results, zero_shot, params, args, command)
        if sweep:
            text += "\n".join(sweep_table(sweep, chosen)) + "\n"
        out.write_text(text + "\n" + READING_MARK + reading)
        out.with_suffix(".json").write_text(json.dumps({"zero_shot": zero_shot, "params": params, "runs": results,
                                                        "sweep": sweep}, indent=1))
        plot_curves(results, zero_shot, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
