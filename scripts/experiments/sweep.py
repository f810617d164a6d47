#!/usr/bin/env python
"""MiniLM sentiment (Rotten Tomatoes) at the recipe's budget: each adapter's learning rate picked by a
3-value sweep on a validation split, then 3 seeds at that rate, scored on a test split the sweep never saw.

Splits (fixed, seed 1234, from the packaged corpus): test 1000 reviews, validation 500, train the
rest. Every run: all-MiniLM-L6-v2, the adapters of scripts/experiments/adapters.py (query/value,
rank 8, no dropout), batch 32, max_length 64, linear schedule with 10% warm-up, AdamW without
weight decay, --steps steps. Phase 1 trains seed 0 at each rate and evaluates on validation; the
rate with the best validation accuracy (then loss) wins. Phase 2 trains seeds 1 and 2 at that rate;
all three seeds' final adapters are scored on the test split with `train.py eval`.

  OMP_NUM_THREADS=1 python scripts/experiments/sentiment_sweep.py --worker 0/2 &
  OMP_NUM_THREADS=1 python scripts/experiments/sentiment_sweep.py --worker 1/2 &
  (wait; the same with --phase seeds; then)  python scripts/experiments/sentiment_sweep.py --report

Workers split the runs by index; a run whose directory holds its results is not repeated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _experiment_module(name: str):
    """scripts/experiments/<name>.py under another module name: `adapters` is the repo's package."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # it puts the repo root on sys.path
    return module


exp = _experiment_module("adapters")  # the method settings and the run helpers

METHODS = ("lora", "pissa", "dora", "adalora", "triadaptlora", "balora")
LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2)
SPLITS = {"test": 1000, "validation": 500}


def method_overrides(method: str) -> list[str]:
    if method == "dora":  # LoRA's settings with the magnitude vector
        base = exp.method_overrides("lora", ["query", "value"])
        return ["adapter.type=dora"] + [o for o in base if o != "adapter.type=lora"]
    overrides = exp.method_overrides(method, ["query", "value"])
    if method == "adalora":  # the shipped defaults (issue 11's fix): scale 8 x init_r, budget schedule from max_steps
        overrides = [o for o in overrides if not o.startswith(("adapter.alpha=", "adapter.tinit=", "adapter.tfinal="))]
    return overrides


def write_splits(workdir: Path) -> dict[str, Path]:
    from trainer.data import packaged

    paths = {name: workdir / f"{name}.jsonl" for name in ("train", *SPLITS)}
    if all(p.exists() for p in paths.values()):
        return paths
    rows = packaged.load("rotten_tomatoes", "data.path")
    random.Random(1234).shuffle(rows)
    start = 0
    workdir.mkdir(parents=True, exist_ok=True)
    for name, size in SPLITS.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        start += size
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in rows[start:]))
    return paths


def run_dir(workdir: Path, method: str, lr: float, seed: int) -> Path:
    return workdir / "runs" / f"{method}-lr{lr:g}-s{seed}"


def train(workdir: Path, paths: dict, method: str, lr: float, seed: int, steps: int) -> None:
    out = run_dir(workdir, method, lr, seed)
    if any("eval/accuracy" in r for r in exp.read_metrics(out)):
        return
    overrides = ["model.name_or_path=packaged:all-minilm-l6-v2", "model.task=sequence_classification",
                 "model.num_labels=2", "data.format=classification", "data.max_length=64",
                 f"data.path={paths['train']}", f"data.eval_path={paths['validation']}",
                 "train.batch_size=32", f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                 "train.lr_schedule=linear", "train.eval_every=0", "train.log_every=5", f"train.save_every={steps}",
                 "train.keep_last=1", f"train.seed={seed}", f"train.output_dir={out}", "train.overwrite=true",
                 "optim.name=adamw", f"optim.lr={lr}", "optim.weight_decay=0", "tracking.wandb=false",
                 *method_overrides(method)]
    began = time.perf_counter()
    if exp.run_cli(overrides):
        raise SystemExit(f"{method} lr {lr} seed {seed} failed")
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - began:.1f}")


def test_score(workdir: Path, paths: dict, method: str, lr: float, seed: int) -> dict:
    out = run_dir(workdir, method, lr, seed)
    report = out / "test-report.json"
    if not report.exists():
        from trainer.cli import main

        if main(["eval", "--run", str(out), "--data", str(paths["test"]), "--out", str(report)]):
            raise SystemExit(f"eval of {out} failed")
    return json.loads(report.read_text())


def validation(workdir: Path, method: str, lr: float, seed: int = 0) -> dict | None:
    rows = [r for r in exp.read_metrics(run_dir(workdir, method, lr, seed)) if "eval/accuracy" in r]
    return rows[-1] if rows else None


def best_lr(workdir: Path, method: str) -> float:
    scored = [(validation(workdir, method, lr), lr) for lr in LRS]
    missing = [lr for v, lr in scored if v is None]
    if missing:
        raise SystemExit(f"{method}: the sweep has not finished (lr {missing})")
    return max(scored, key=lambda s: (s[0]["eval/accuracy"], -s[0]["eval/loss"]))[1]


def jobs(phase: str, workdir: Path, methods: list[str]) -> list[tuple[str, float, int]]:
    if phase == "sweep":
        return [(m, lr, 0) for m in methods for lr in LRS]
    return [(m, best_lr(workdir, m), s) for m in methods for s in SEEDS if s != 0]


def report(workdir: Path, paths: dict, methods: list[str], steps: int, out: Path) -> None:
    lines = [f"## MiniLM sentiment: learning rate swept on validation, 3 seeds on test ({steps} steps of 32)", "",
             "Validation accuracy of seed 0 at each rate (the sweep), then the test accuracy of the best rate "
             "over seeds 0-2 (mean ± std).", "",
             "| method | " + " | ".join(f"val acc @ {lr:g}" for lr in LRS) + " | best lr | test accuracy | "
             "test loss | per seed | trainable params | wall s / run |",
             "|---|" + "---|" * len(LRS) + "---|---|---|---|---|---|"]
    summary = {}
    for m in methods:
        vals = [validation(workdir, m, lr) for lr in LRS]
        lr = best_lr(workdir, m)
        tests = [test_score(workdir, paths, m, lr, s) for s in SEEDS]
        acc = [t["metrics"]["accuracy"] for t in tests]
        loss = [t["metrics"]["loss"] for t in tests]
        walls = [float((run_dir(workdir, m, lr, s) / "wall_s.txt").read_text()) for s in SEEDS]
        params = exp.result_of("sentiment", m, 0, run_dir(workdir, m, lr, 0), None)["trainable_params"]
        summary[m] = {"lr": lr, "validation": {f"{r:g}": v["eval/accuracy"] for r, v in zip(LRS, vals)},
                      "test_accuracy": acc, "test_loss": loss, "trainable_params": params}
        lines.append(f"| {m} | " + " | ".join(f"{v['eval/accuracy']:.4f}" for v in vals) + f" | {lr:g} | "
                     f"{exp.mean_std(acc)} | {exp.mean_std(loss)} | {' / '.join(f'{a:.3f}' for a in acc)} | "
                     f"{params:,} | {statistics.mean(walls):.0f} |")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/exp-sentiment-sweep")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--phase", choices=["sweep", "seeds"], default="sweep")
    p.add_argument("--worker", default="0/1", help="i/n: this process runs every n-th job from the i-th")
    p.add_argument("--report", help="write the markdown table here instead of training")
    a = p.parse_args()
    workdir = Path(a.workdir).resolve()
    methods = a.methods.split(",")
    paths = write_splits(workdir)
    if a.report:
        report(workdir, paths, methods, a.steps, Path(a.report))
        return
    index, count = (int(x) for x in a.worker.split("/"))
    for method, lr, seed in jobs(a.phase, workdir, methods)[index::count]:
        print(json.dumps({"method": method, "lr": lr, "seed": seed, "start": time.strftime("%H:%M:%S")}), flush=True)
        train(workdir, paths, method, lr, seed, a.steps)


if __name__ == "__main__":
    main()
