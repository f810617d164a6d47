#!/usr/bin/env python
"""Does each shipped recipe learn, run exactly as shipped? For every configs/<recipe>.yaml asked for: one run as
shipped, and one run of the same recipe for four steps at a vanishing learning rate (four: AdaLoRA fixes its
budget after half the steps and needs a step of rank scores before that), whose final evaluation is the
untrained model's on the same held-out split with the same metric (every adapter here starts as the identity:
LoRA's B = 0, PiSSA's residual plus principal part, AdaLoRA's E = 0, TriAdaptLoRA's B = 0, DoRA's magnitude =
the weight's norm). Prints one table row per recipe: the held-out metric untrained and trained, and the margin.

  OMP_NUM_THREADS=2 python scripts/experiments/recipes.py --recipes minilm-sentiment-lora,smollm2-lora --out FILE

A finished run (its directory holds the evaluation of its last step) is not repeated, and a stopped one resumes from its last
checkpoint (the long recipes save every 100 steps), so the script can be stopped and rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from run_metrics import final_eval

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from trainer.checkpoint import latest_checkpoint  # noqa: E402

# the held-out metric each task reports, and whether higher is better
METRICS = {"eval/accuracy": True, "eval/mrr@10": True, "eval/loss": False}


def finished_eval(run_dir: Path) -> dict | None:
    """The evaluation at the run's last step, or None for a run not started, stopped or failed (a stopped run
    may hold evaluations of earlier steps)."""
    last = final_eval(run_dir)
    config = run_dir / "config.yaml"
    if last is None or not config.exists():
        return None
    return last if last["step"] >= yaml.safe_load(config.read_text())["train"]["max_steps"] else None


def train(recipe: str, out: Path, overrides: list[str]) -> dict:
    if finished_eval(out) is None:
        env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
        # a stopped run continues from its last checkpoint (exact resume), anything else starts afresh
        start = "train.resume=auto" if latest_checkpoint(out) else "train.overwrite=true"
        cmd = [sys.executable, "train.py", "--config", f"configs/{recipe}.yaml", f"train.output_dir={out}",
               start, "tracking.wandb=false", *overrides]
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
            raise SystemExit(f"{recipe}: `{' '.join(cmd)}` failed")
    return finished_eval(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", required=True, help="comma-separated names of configs/<name>.yaml")
    p.add_argument("--workdir", default="runs/exp-recipes")
    p.add_argument("--out", help="markdown table here (and <out>.json)")
    args = p.parse_args()
    recipes = args.recipes.split(",")
    missing = [r for r in recipes if not (ROOT / "configs" / f"{r}.yaml").exists()]
    if missing:
        p.error(f"--recipes: no configs/<name>.yaml for {missing}")
    workdir = Path(args.workdir).resolve()
    lines = ["| recipe | metric | untrained | as shipped | margin |", "|---|---|---|---|---|"]
    results = {}
    for recipe in recipes:
        untrained = train(recipe, workdir / f"{recipe}-untrained",
                          ["optim.lr=1e-12", "train.max_steps=4", "train.warmup_steps=0", "train.eval_every=0"])
        trained = train(recipe, workdir / recipe, [])
        metric = next(m for m in METRICS if m in trained)
        margin = (trained[metric] - untrained[metric]) * (1 if METRICS[metric] else -1)
        results[recipe] = {"metric": metric, "untrained": untrained[metric], "trained": trained[metric],
                           "margin": margin, "steps": trained["step"]}
        lines.append(f"| {recipe} | {metric} ({'higher' if METRICS[metric] else 'lower'} is better) | "
                     f"{untrained[metric]:.4f} | {trained[metric]:.4f} | {margin:+.4f} |")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
