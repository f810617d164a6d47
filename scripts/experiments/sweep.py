#!/usr/bin/env python
"""Each adapter at its own learning rate: a 3-value sweep on a validation split, then 3 seeds at the best
rate, scored on a test split the sweep never saw. Two tasks (--task):

- sentiment: all-MiniLM-L6-v2 on the packaged Rotten Tomatoes reviews. Splits (fixed, seed 1234): test
  1000 reviews, validation 500, train the rest. query/value adapters, batch 32, max_length 64. The best
  validation accuracy (then loss) picks the rate.
- chat: SmolLM2-135M-Instruct chat SFT on the packaged chit-chat conversations. Splits (fixed, seed 1234):
  test 100 conversations, validation 50, train the rest. q/k/v/o adapters of the top 8 layers (22-29, as
  scripts/experiments/adapters.py: backward stops there, which keeps a run a few minutes on a CPU),
  batch 4, max_length 128, loss on assistant tokens. The lowest validation loss picks the rate.

Every run: the adapters of scripts/experiments/adapters.py (rank 8, no dropout), linear schedule with 10%
warm-up, AdamW without weight decay, --steps steps. Phase `sweep` trains seed 0 at each rate and evaluates
on validation; phase `extend` adds one rate beyond the grid's edge where the best rate is
at that edge (bracket.py); phase `seeds` trains seeds 1 and 2 at the winning rate, and the ablations (ABLATIONS: a
method with one part switched off) at their parent's rate for seeds 0-2. A method with no sweep in --workdir
whose rate a published sweep recorded (RECORDED_LRS) trains seeds 0-2 at that rate: a longer run of the same
study (--steps, a new --workdir) reuses the rates picked at the shorter budget. All final adapters are scored on
the test split with `train.py eval`.

  OMP_NUM_THREADS=1 python scripts/experiments/sweep.py --task chat --worker 0/2 &
  OMP_NUM_THREADS=1 python scripts/experiments/sweep.py --task chat --worker 1/2 &
  (wait; the same with --phase seeds; then)  python scripts/experiments/sweep.py --task chat --report FILE

Workers split the runs by index; a run whose directory holds its results is not repeated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
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
past_edge = _experiment_module("bracket").past_edge

METHODS = ("lora", "pissa", "dora", "adalora", "triadaptlora", "balora")
LRS = (1e-3, 3e-3, 1e-2)
# phase `extend`: where the best rate run is the largest (or smallest), one more rate a factor STEP beyond
# it, so that the chosen rate is bracketed; the report then picks among all rates a method ran
STEP = 3.0
SEEDS = (0, 1, 2)

TASKS = {
    "sentiment": {
        "corpus": "rotten_tomatoes", "splits": {"test": 1000, "validation": 500}, "targets": ["query", "value"],
        "overrides": ["model.name_or_path=packaged:all-minilm-l6-v2", "model.task=sequence_classification",
                      "model.num_labels=2", "data.format=classification", "data.max_length=64",
                      "train.batch_size=32"],
        # the best validation accuracy, then the lowest loss
        "metric": "eval/accuracy", "rank": lambda v: (v["eval/accuracy"], -v["eval/loss"]),
        "title": "MiniLM sentiment", "batch": 32,
    },
    "chat": {
        "corpus": "chitchat", "splits": {"test": 100, "validation": 50}, "targets": exp.SMOLLM2_TOP8,
        "overrides": ["model.name_or_path=packaged:smollm2-135m-instruct", "model.task=causal_lm",
                      "data.format=chat", "data.max_length=128", "train.batch_size=4"],
        "metric": "eval/loss", "rank": lambda v: -v["eval/loss"],
        "title": "SmolLM2 chat SFT", "batch": 4,
    },
}

# name -> (parent method, overrides that switch one part off); run at the parent's best rate, seeds 0-2
ABLATIONS = {
    "balora-no-consistency": ("balora", ["adapter.lambda_consistency=0"]),
    "balora-no-diversity": ("balora", ["adapter.lambda_diversity=0"]),
    "balora-no-svd": ("balora", ["adapter.lambda_svd=0"]),
    # every matrix starts at the reference rank, so the budget is spent at step 0 and nothing grows
    "triadaptlora-no-growth": ("triadaptlora", ["adapter.init_rank=8"]),
}


# Winning rates of sweeps run earlier into other work directories, from their published results
# (docs/results/sentiment-sweep.json): an ablation reuses them without re-running the parent's sweep.
RECORDED_LRS = {"sentiment": {m: v["lr"] for m, v in json.loads(
    (HERE.parent.parent / "docs/results/sentiment-sweep.json").read_text()).items()}}


def method_overrides(method: str, targets: list[str]) -> list[str]:
    if method in ABLATIONS:
        parent, switch_off = ABLATIONS[method]
        return method_overrides(parent, targets) + switch_off
    if method == "dora":  # LoRA's settings with the magnitude vector
        base = exp.method_overrides("lora", targets)
        return ["adapter.type=dora"] + [o for o in base if o != "adapter.type=lora"]
    overrides = exp.method_overrides(method, targets)
    if method == "adalora":  # the shipped defaults (issue 11's fix): scale 8 x init_r, budget schedule from max_steps
        overrides = [o for o in overrides if not o.startswith(("adapter.alpha=", "adapter.tinit=", "adapter.tfinal="))]
    return overrides


def write_splits(task: str, workdir: Path) -> dict[str, Path]:
    from trainer.data import packaged

    splits = TASKS[task]["splits"]
    paths = {name: workdir / f"{name}.jsonl" for name in ("train", *splits)}
    if all(p.exists() for p in paths.values()):
        return paths
    rows = packaged.load(TASKS[task]["corpus"], "data.path")
    random.Random(1234).shuffle(rows)
    start = 0
    workdir.mkdir(parents=True, exist_ok=True)
    for name, size in splits.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        start += size
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in rows[start:]))
    return paths


def run_dir(workdir: Path, method: str, lr: float, seed: int) -> Path:
    return workdir / "runs" / f"{method}-lr{lr:g}-s{seed}"


def train(task: str, workdir: Path, paths: dict, method: str, lr: float, seed: int, steps: int) -> None:
    out = run_dir(workdir, method, lr, seed)
    if any(TASKS[task]["metric"] in r for r in exp.read_metrics(out)):
        return
    overrides = [*TASKS[task]["overrides"], f"data.path={paths['train']}", f"data.eval_path={paths['validation']}",
                 f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                 "train.lr_schedule=linear", "train.eval_every=0", "train.log_every=5", f"train.save_every={steps}",
                 "train.keep_last=1", f"train.seed={seed}", f"train.output_dir={out}", "train.overwrite=true",
                 "optim.name=adamw", f"optim.lr={lr}", "optim.weight_decay=0", "tracking.wandb=false",
                 *method_overrides(method, TASKS[task]["targets"])]
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


def validation(task: str, workdir: Path, method: str, lr: float, seed: int = 0) -> dict | None:
    rows = [r for r in exp.read_metrics(run_dir(workdir, method, lr, seed)) if TASKS[task]["metric"] in r]
    return rows[-1] if rows else None


def best_lr(task: str, workdir: Path, method: str) -> float:
    method = ABLATIONS[method][0] if method in ABLATIONS else method
    if uses_recorded_rate(task, workdir, method):
        return RECORDED_LRS[task][method]  # a sweep whose runs live elsewhere, as its results page states
    scores = swept(task, workdir, method)
    return max(scores, key=scores.__getitem__)


def uses_recorded_rate(task: str, workdir: Path, method: str) -> bool:
    """A method whose grid did not run (whole) in this work directory and whose rate a published sweep recorded.
    Its seed-0 run here is then a seed like the others, not part of a sweep."""
    return method in RECORDED_LRS.get(task, {}) and not all(validation(task, workdir, method, lr) for lr in LRS)


def has_sweep(task: str, workdir: Path, method: str) -> bool:
    """Whether the method's rate is picked from a sweep in this work directory."""
    return method not in ABLATIONS and not uses_recorded_rate(task, workdir, method)


def swept(task: str, workdir: Path, method: str) -> dict[float, tuple]:
    """Every rate seed 0 ran to its validation score -> its rank (higher is better); the grid must be complete."""
    missing = [lr for lr in LRS if validation(task, workdir, method, lr) is None]
    if missing:
        raise SystemExit(f"{method}: the sweep has not finished (lr {missing})")
    name = re.compile(rf"{re.escape(method)}-lr([0-9.e+-]+)-s0")
    rates = [float(m[1]) for d in (workdir / "runs").iterdir() if (m := name.fullmatch(d.name))]
    return {lr: TASKS[task]["rank"](v) for lr in sorted(rates) if (v := validation(task, workdir, method, lr))}


def jobs(task: str, phase: str, workdir: Path, methods: list[str]) -> list[tuple[str, float, int]]:
    if phase == "sweep":
        return [(m, lr, 0) for m in methods if m not in ABLATIONS for lr in LRS]
    if phase == "extend":
        return [(m, lr, 0) for m in methods if has_sweep(task, workdir, m)
                if (lr := past_edge(swept(task, workdir, m), STEP)) is not None]
    # seed 0 is the sweep's run, except for ablations and methods whose rate was swept elsewhere; seed by seed,
    # so that a study stopped early has the same seeds for every method
    return [(m, best_lr(task, workdir, m), s) for s in SEEDS for m in methods
            if s != 0 or m in ABLATIONS or uses_recorded_rate(task, workdir, m)]


def report(task: str, workdir: Path, paths: dict, methods: list[str], steps: int, out: Path) -> None:
    spec = TASKS[task]
    metric = spec["metric"]
    name = metric.split("/")[1]
    rates = sorted(set(LRS).union(*(swept(task, workdir, m) for m in methods if has_sweep(task, workdir, m))))
    lines = [f"## {spec['title']}: learning rate swept on validation, 3 seeds on test "
             f"({steps} steps of {spec['batch']})", "",
             f"Validation {name} of seed 0 at each rate (the sweep), then the test metrics of the best rate "
             "over seeds 0-2 (mean ± std). Ablations run at their parent's rate.", "",
             "| method | " + " | ".join(f"val {name} @ {lr:g}" for lr in rates) + " | best lr | seeds | test accuracy | "
             "test loss | per seed | trainable params | wall s / run |",
             "|---|" + "---|" * len(rates) + "---|---|---|---|---|---|---|"]
    if task == "chat":
        lines[-2] = lines[-2].replace(" test accuracy | test loss |", " test loss | test perplexity |")
        base = exp.untrained_eval("packaged:smollm2-135m-instruct", "causal_lm", paths["test"], 128,
                                  workdir / "untrained-test.json")
        lines.insert(2, f"Untrained model on the test split: loss {base['eval_loss']:.4f} per assistant token.\n")
    summary = {}
    for m in methods:
        vals = [None if m in ABLATIONS else validation(task, workdir, m, lr) for lr in rates]
        lr = best_lr(task, workdir, m)
        seeds = [s for s in SEEDS if (run_dir(workdir, m, lr, s) / "wall_s.txt").exists()]  # the finished ones
        if not seeds:
            raise SystemExit(f"--report: {m} has no finished run at its rate {lr:g} in {workdir / 'runs'}; "
                             f"run --phase seeds --methods {m} first")
        tests = [test_score(workdir, paths, m, lr, s)["metrics"] for s in seeds]
        first, second = ("accuracy", "loss") if task == "sentiment" else ("loss", "perplexity")
        a, b = [t[first] for t in tests], [t[second] for t in tests]
        walls = [float((run_dir(workdir, m, lr, s) / "wall_s.txt").read_text()) for s in seeds]
        params = exp.result_of(task, m, seeds[0], run_dir(workdir, m, lr, seeds[0]), None)["trainable_params"]
        summary[m] = {"lr": lr, "validation": {f"{r:g}": v[metric] for r, v in zip(rates, vals) if v},
                      "seeds": seeds, f"test_{first}": a, f"test_{second}": b, "trainable_params": params}
        cells = " | ".join("-" if v is None else f"{v[metric]:.4f}" for v in vals)
        # a best rate on the edge of the rates run is not bracketed
        edge = " (edge)" if has_sweep(task, workdir, m) and past_edge(swept(task, workdir, m), STEP) else ""
        lines.append(f"| {m} | {cells} | {lr:g}{edge} | {len(seeds)} | {exp.mean_std(a)} | {exp.mean_std(b)} | "
                     f"{' / '.join(f'{x:.4f}' for x in a)} | {params:,} | {statistics.mean(walls):.0f} |")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    p.add_argument("--workdir", help="default: runs/exp-<task>-sweep")
    p.add_argument("--methods", default=",".join(METHODS), help=f"of {METHODS} and the ablations {tuple(ABLATIONS)}")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--phase", choices=["sweep", "extend", "seeds"], default="sweep")
    p.add_argument("--worker", default="0/1", help="i/n: this process runs every n-th job from the i-th")
    p.add_argument("--report", help="write the markdown table here instead of training")
    a = p.parse_args()
    workdir = Path(a.workdir or f"runs/exp-{a.task}-sweep").resolve()
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in ABLATIONS]
    if unknown:
        p.error(f"--methods: unknown {unknown}")
    paths = write_splits(a.task, workdir)
    if a.report:
        report(a.task, workdir, paths, methods, a.steps, Path(a.report))
        return
    index, count = (int(x) for x in a.worker.split("/"))
    for method, lr, seed in jobs(a.task, a.phase, workdir, methods)[index::count]:
        print(json.dumps({"method": method, "lr": lr, "seed": seed, "start": time.strftime("%H:%M:%S")}), flush=True)
        train(a.task, workdir, paths, method, lr, seed, a.steps)


if __name__ == "__main__":
    main()
