#!/usr/bin/env python
"""LoRA, AdaLoRA, PiSSA, TriAdaptLoRA and BA-LoRA at equal trainable-parameter budgets, 3 seeds:
(a) all-MiniLM-L6-v2 sentiment classification on Rotten Tomatoes (held-out accuracy) and
(b) SmolLM2-135M-Instruct chat SFT on BYU chit-chat (held-out loss).

Every run goes through the real trainer (trainer.cli.main, in this process, so imports load
once). The held-out subsets are fixed once per task (written under --workdir): seeds change
only the adapter initialisation and the data order. One evaluation of the untrained base model
per task (no adapter; for MiniLM its randomly initialised classifier head) gives the starting point.

Budgets: every method adapts the same modules at rank 8 (AdaLoRA: init_r 8, pruned to an
average of 6; TriAdaptLoRA: grows from rank 1 to an average of 8, plus its cores). The trainable
counts are read from each run's final checkpoint. The CPU budget (2 cores shared with other
jobs, about 45 minutes for the 30 runs) sets the sizes: MiniLM 40 steps of 16 reviews (32
tokens); SmolLM2 12 steps of 2 conversations (96 tokens) with the adapters on the top 8 of 30
layers, which also keeps the backward pass short. All methods share one learning rate per task
(5e-3 and 1e-3; no per-method tuning).

  OMP_NUM_THREADS=1 python scripts/experiments/adapters.py --out docs/results/adapters.md

(the two tasks can run as two processes, `--tasks sentiment` and `--tasks chat` with the same
--workdir, then `--report-only` writes the report from both). It prints one JSON line per run and
writes the tables to --out, the plot to the .png of the same name and all runs to
<workdir>/results.json; a section after the line `<!-- reading -->` in an existing --out is kept. A run whose directory
already holds its final metrics is read, not repeated (--fresh repeats it).
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

from run_metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

READING_MARK = "<!-- reading -->"
METHODS = ("lora", "adalora", "pissa", "triadaptlora", "balora")
SMOLLM2_TOP8 = [f"layers.{i}.self_attn.{p}_proj" for i in range(22, 30) for p in ("q", "k", "v", "o")]


def _list(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


TASKS = {
    "sentiment": {
        "title": "MiniLM sentiment (Rotten Tomatoes)",
        "model": "packaged:all-minilm-l6-v2", "task": "sequence_classification", "corpus": "rotten_tomatoes",
        "eval_rows": 200, "train_rows": 2000, "metric": "eval/accuracy", "higher_is_better": True,
        "targets": ["query", "value"],
        "overrides": ["model.num_labels=2", "data.format=classification", "data.max_length=32",
                      "train.batch_size=16", "train.max_steps=40", "train.warmup_steps=4", "optim.lr=5e-3"],
    },
    "chat": {
        "title": "SmolLM2 chat SFT (chit-chat)",
        "model": "packaged:smollm2-135m-instruct", "task": "causal_lm", "corpus": "chitchat",
        "eval_rows": 12, "train_rows": 600, "metric": "eval/loss", "higher_is_better": False,
        "targets": SMOLLM2_TOP8,
        "overrides": ["data.format=chat", "data.max_length=96", "train.batch_size=2", "train.max_steps=12",
                      "train.warmup_steps=1", "optim.lr=1e-3"],
    },
}
SHARED = ["optim.name=adamw", "optim.weight_decay=0", "train.lr_schedule=linear", "train.eval_every=0",
          "train.log_every=1", "tracking.wandb=false"]


def method_overrides(method: str, targets: list[str]) -> list[str]:
    """The adapter section of each method: same modules, rank 8, no dropout."""
    t = f"adapter.target_modules={_list(targets)}"
    return {
        "lora": ["adapter.type=lora", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0", t],
        # alpha 8 = r as in PiSSA/BA-LoRA: PiSSA and BA-LoRA differ only by BA-LoRA's regularisers
        "pissa": ["adapter.type=lora", "adapter.init=pissa", "adapter.r=8", "adapter.alpha=8", "adapter.dropout=0", t],
        # scale alpha/init_r = 2 as LoRA's; prune from 8 to an average of 6 between 10 % and 70 % of the steps
        "adalora": ["adapter.type=adalora", "adapter.init_r=8", "adapter.target_r=6", "adapter.alpha=16",
                    "adapter.dropout=0", "adapter.tinit=__TINIT__", "adapter.tfinal=__TFINAL__",
                    "adapter.orth_reg_weight=0.1", t],
        # budget = 8 x #matrices; the orthogonality weight 0.1 of IncreLoRA's scripts (research note)
        "triadaptlora": ["adapter.type=triadaptlora", "adapter.r=8", "adapter.init_rank=1", "adapter.alpha=16",
                         "adapter.dropout=0", "adapter.orth_reg_weight=0.1", t],
        # the paper's regulariser weights for the task form (NLU for MiniLM, NLG for SmolLM2)
        "balora": ["adapter.type=balora", "adapter.r=8", "adapter.alpha=8", t],
    }[method]


def run_overrides(task: str, method: str, seed: int, workdir: Path) -> list[str]:
    spec = TASKS[task]
    steps = int(next(o for o in spec["overrides"] if o.startswith("train.max_steps=")).split("=")[1])
    adapter = [o.replace("__TINIT__", str(max(1, steps // 10))).replace("__TFINAL__", str(max(1, 3 * steps // 10)))
               for o in method_overrides(method, spec["targets"])]
    return [f"model.name_or_path={spec['model']}", f"model.task={spec['task']}",
            f"data.path={workdir / f'{task}-train.jsonl'}", f"data.eval_path={workdir / f'{task}-eval.jsonl'}",
            *spec["overrides"], *SHARED, *adapter, f"train.seed={seed}", f"train.save_every={steps}",
            "train.keep_last=1", f"train.output_dir={workdir / 'runs' / f'{task}-{method}-s{seed}'}",
            "train.overwrite=true"]


# ----- data ----------------------------------------------------------------------------------------
def write_split(task: str, workdir: Path) -> None:
    """Seeded, fixed held-out and training subsets of the packaged corpus, as jsonl."""
    from trainer.data import packaged

    spec = TASKS[task]
    train_path, eval_path = workdir / f"{task}-train.jsonl", workdir / f"{task}-eval.jsonl"
    if train_path.exists() and eval_path.exists():
        return
    rows = packaged.load(spec["corpus"], "data.path")
    random.Random(1234).shuffle(rows)
    held_out, train = rows[:spec["eval_rows"]], rows[spec["eval_rows"]:spec["eval_rows"] + spec["train_rows"]]
    workdir.mkdir(parents=True, exist_ok=True)
    for path, part in ((eval_path, held_out), (train_path, train)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))


# ----- runs ----------------------------------------------------------------------------------------
def run_cli(overrides: list[str]) -> int:
    """trainer.cli.main in this process, with accelerate's singletons reset between runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from trainer.cli import main
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return main(overrides)


def result_of(task: str, method: str, seed: int, run_dir: Path, wall_s: float | None) -> dict:
    from safetensors import safe_open

    rows = read_metrics(run_dir)
    final = [r for r in rows if "eval/loss" in r][-1]
    steps = [r for r in rows if "loss" in r]
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        names = list(f.keys())
        params = sum(_numel(f.get_slice(k).get_shape()) for k in names)
        head = sum(_numel(f.get_slice(k).get_shape()) for k in names if ".classifier." in k or k.startswith("classifier."))
    out = {"task": task, "method": method, "seed": seed, "eval_loss": final["eval/loss"],
           "eval_accuracy": final.get("eval/accuracy"), "trainable_params": params, "head_params": head,
           "train_loss_last5": statistics.mean(r["loss"] for r in steps[-5:]),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
           "total_rank": steps[-1].get("adapter/total_rank"), "wall_s": wall_s,
           "reg_final": {k: v for k, v in steps[-1].items() if k.startswith("reg/")},
           "reg_first": {k: v for k, v in steps[0].items() if k.startswith("reg/")}}
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def base_model_eval(task: str, workdir: Path) -> dict:
    """The untrained model on the held-out subset (classification: its random head)."""
    spec = TASKS[task]
    max_length = int(next(o for o in spec["overrides"] if o.startswith("data.max_length=")).split("=")[1])
    return untrained_eval(spec["model"], spec["task"], workdir / f"{task}-eval.jsonl", max_length,
                          workdir / f"{task}-base.json")


def untrained_eval(model_name: str, model_task: str, eval_path: Path, max_length: int, cache: Path) -> dict:
    """Loss (and accuracy) of the untrained model on every row of `eval_path`, cached in `cache`."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed

    from trainer.data import Collator, build_datasets
    from trainer.models import load_model, load_tokenizer

    if cache.exists():
        return json.loads(cache.read_text())
    model_cfg = SimpleNamespace(name_or_path=model_name, task=model_task, num_labels=2, dtype="float32",
                                attn_implementation=None)
    data_cfg = SimpleNamespace(path=str(eval_path), format=None, eval_path=None, eval_fraction=0.0,
                               max_length=max_length, packing=False, max_examples=None)
    tokenizer = load_tokenizer(model_cfg)
    examples, _ = build_datasets(data_cfg, tokenizer, model_task, 0)
    set_seed(0)
    model = load_model(model_cfg, tokenizer).eval()
    collate = Collator(tokenizer.pad_token_id, model_task, packed=False)
    loss = units = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i:i + 8])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if "label" in batch:
                loss += float(F.cross_entropy(logits.float(), batch["label"], reduction="sum"))
                units += len(batch["label"])
                correct += float((logits.argmax(-1) == batch["label"]).sum())
            else:
                labels = batch["labels"][:, 1:].flatten()
                loss += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels, ignore_index=-100,
                                              reduction="sum"))
                units += float((labels != -100).sum())
    out = {"eval_loss": loss / units, "eval_accuracy": correct / units if model_task != "causal_lm" else None,
           "examples": len(examples)}
    if model_task != "causal_lm":
        labels = [e["label"] for e in examples]
        out["majority_accuracy"] = max(labels.count(c) for c in set(labels)) / len(labels)
    cache.write_text(json.dumps(out))
    return out


# ----- report --------------------------------------------------------------------------------------
def mean_std(values: list[float], fmt: str = "{:.4f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def tables(results: list[dict], base: dict, command: str) -> str:
    out = [f"Written by `{command}`.", ""]
    for task, spec in TASKS.items():
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        key = "eval_accuracy" if spec["higher_is_better"] else "eval_loss"
        ref = statistics.mean(r[key] for r in rows if r["method"] == "lora") if any(r["method"] == "lora" for r in rows) else None
        accuracy = key == "eval_accuracy"
        loss_col = " held-out loss |" if accuracy else ""
        out += [f"### {spec['title']}", "",
                f"| method | seeds | held-out {'accuracy' if accuracy else 'loss'} | vs LoRA |{loss_col} trainable params | "
                f"final total rank | train loss (last 5 steps) | train {'examples' if accuracy else 'loss tokens'}/s | wall s |",
                "|---|---|---|---|" + ("---|" if accuracy else "") + "---|---|---|---|---|"]
        b = base.get(task)
        if b:
            shown = f"{b[key]:.4f}"
            out.append(f"| base model, untrained | - | {shown} | - |" + (f" {b['eval_loss']:.4f} |" if accuracy else "")
                       + " 0 | - | - | - | - |")
        for method in METHODS:
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            vals = [r[key] for r in rs]
            delta = statistics.mean(vals) - ref if ref is not None else float("nan")
            params = sorted({r["trainable_params"] for r in rs})
            ranks = [r["total_rank"] for r in rs if r["total_rank"] is not None]
            loss = f" {mean_std([r['eval_loss'] for r in rs])} |" if accuracy else ""
            out.append(
                f"| {method} | {len(rs)} | {mean_std(vals)} | {delta:+.4f} |{loss} "
                f"{'/'.join(f'{p:,}' for p in params)} | {mean_std(ranks, '{:.0f}') if ranks else '-'} | "
                f"{mean_std([r['train_loss_last5'] for r in rs])} | {statistics.mean(r['tokens_per_s'] for r in rs):.1f} | "
                f"{statistics.mean(r['wall_s'] or 0 for r in rs):.0f} |")
        if b and b.get("majority_accuracy") is not None:
            out.append(f"\nHeld-out: {b['examples']} examples; majority class {b['majority_accuracy']:.3f}. "
                       f"Trainable counts include the {rows[0]['head_params']:,}-parameter classifier head.")
        elif b:
            out.append(f"\nHeld-out: {b['examples']} conversations.")
        per_seed = ["", "Per seed (" + key.replace("eval_", "held-out ") + "):", "",
                    "| method | " + " | ".join(f"seed {s}" for s in sorted({r['seed'] for r in rows})) + " |",
                    "|---|" + "---|" * len({r['seed'] for r in rows})]
        for method in METHODS:
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
            if rs:
                per_seed.append(f"| {method} | " + " | ".join(f"{r[key]:.4f}" for r in rs) + " |")
        out += per_seed + [""]
    return "\n".join(out)


def plot(results: list[dict], base: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5.5 * len(TASKS), 3.8))
    for ax, (task, spec) in zip(axes, TASKS.items()):
        key = "eval_accuracy" if spec["higher_is_better"] else "eval_loss"
        for i, method in enumerate(METHODS):
            vals = [r[key] for r in results if r["task"] == task and r["method"] == method]
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, color="0.6", s=14, zorder=2)
            mean = statistics.mean(vals)
            err = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.errorbar([i], [mean], yerr=[err], fmt="o", color="C0", capsize=4, zorder=3)
        if base.get(task) and base[task].get(key) is not None:
            ax.axhline(base[task][key], color="C3", ls="--", lw=1, label="untrained base")
            if key == "eval_accuracy" and base[task].get("majority_accuracy"):
                ax.axhline(base[task]["majority_accuracy"], color="0.4", ls=":", lw=1, label="majority class")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=20)
        ax.set_ylabel("held-out accuracy" if key == "eval_accuracy" else "held-out loss (nats/token)")
        ax.set_title(spec["title"], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean ± std over seeds (grey: single seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/adapters.md", help="markdown report; the plot goes beside it (.png)")
    p.add_argument("--workdir", default="runs/experiments/adapters", help="data subsets and run directories")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fresh", action="store_true", help="repeat runs that already finished")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = p.parse_args()
    workdir, out = Path(args.workdir).resolve(), Path(args.out)
    command = "OMP_NUM_THREADS=1 python scripts/experiments/adapters.py " + " ".join(sys.argv[1:])
    results, base = [], {}
    for task in args.tasks.split(","):
        write_split(task, workdir)
        base[task] = base_model_eval(task, workdir)
        print(json.dumps({"task": task, "base": base[task]}), flush=True)
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                run_dir = workdir / "runs" / f"{task}-{method}-s{seed}"
                done = any("eval/loss" in r for r in read_metrics(run_dir))
                timing = run_dir / "wall_s.txt"
                if args.report_only and not done:
                    continue
                if not done or args.fresh:
                    began = time.perf_counter()
                    code = run_cli(run_overrides(task, method, seed, workdir))
                    if code:
                        raise SystemExit(f"{task} {method} seed {seed} exited {code}")
                    timing.write_text(f"{time.perf_counter() - began:.1f}")
                wall = float(timing.read_text()) if timing.exists() else None
                row = result_of(task, method, seed, run_dir, wall)
                results.append(row)
                print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps({"base": base, "runs": results, "command": command}, indent=1))
    plot(results, base, out.with_suffix(".png"))
    report = ("# Adapters at equal budgets: MiniLM sentiment and SmolLM2 chat SFT\n\n" + tables(results, base, command)
              + f"\n![held-out metric per method, mean ± std over the seeds]({out.with_suffix('.png').name})\n")
    if out.exists() and READING_MARK in out.read_text():
        report += "\n" + READING_MARK + out.read_text().split(READING_MARK, 1)[1]
    out.write_text(report)
    print(tables(results, base, command))


if __name__ == "__main__":
    main()
