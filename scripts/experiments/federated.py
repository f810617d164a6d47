"""Ferret vs FedAvg vs FedIT on SmolLM2-135M-Instruct, chatterbot Q&A split by topic (3 seeds).

Each run is `train.py federated` (Flower simulation, Ray) with one of the recipes below; the runs
land in `--runs`. The machine is shared, so the script works in chunks: every invocation runs or
resumes (train.resume=auto) the next unfinished runs until `--budget-min` minutes have passed,
then stops; run it again (under the lock) until it reports that all runs are done. `--report`
writes docs/results/federated.md's tables (JSON) and the plots.

    bash scripts/offline.sh .venv/bin/python scripts/experiments/federated.py --budget-min 18
    .venv/bin/python scripts/experiments/federated.py --report

A smaller run (one seed, two methods, fewer rounds; what docs/results/federated.md shows today):

    bash scripts/offline.sh .venv/bin/python scripts/experiments/federated.py \
        --seeds 1 --methods ferret fedavg --set federated.rounds=3 --runs runs/exp-federated-small
    .venv/bin/python scripts/experiments/federated.py --seeds 1 --methods ferret fedavg --runs runs/exp-federated-small --report
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "fed-smollm2-chatterbot.yaml"
SEEDS = (1, 2, 3)
# method -> overrides of the recipe (which runs Ferret on the last 8 layers)
METHODS = {
    "ferret": [],
    "fedavg": ["federated.strategy=fedavg"],
    "fedit": ["federated.strategy=fedit", "adapter.type=lora", "adapter.r=8", "adapter.alpha=16", "adapter.dropout=0.0",
              "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]", "optim.name=adamw", "optim.lr=1e-3"],
}


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / f"{method}-seed{seed}"


def finished(path: Path) -> bool:
    return (path / "adapter").is_dir() or (path / "model").is_dir()


def run_chunks(args) -> None:
    began = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    for seed in args.seeds:
        for method in args.methods:
            overrides = METHODS[method] + args.set
            path = run_dir(Path(args.runs), method, seed)
            if finished(path):
                continue
            if (time.monotonic() - began) / 60 > args.budget_min:
                print("budget spent; run again to continue", flush=True)
                return
            resume = ["train.resume=auto"] if (path / "config.yaml").exists() else []
            cmd = [sys.executable, str(ROOT / "train.py"), "federated", "--config", str(CONFIG), *overrides,
                   f"train.seed={seed}", f"train.output_dir={path}", *resume]
            print(f"{method} seed {seed}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.monotonic()
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            print(f"  rc {done.returncode} in {time.monotonic() - t0:.0f} s", flush=True)
            if done.returncode:
                print(done.stderr[-4000:], flush=True)
                sys.exit(done.returncode)
    print("all runs done", flush=True)


def report(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, table = Path(args.runs), {}
    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"ferret": "tab:red", "fedavg": "tab:blue", "fedit": "tab:green"}
    for method in args.methods:
        color = colors[method]
        curves, per_client = [], []
        for seed in args.seeds:
            path = run_dir(runs, method, seed)
            if not finished(path):
                continue
            rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
            curves.append([r["eval/loss"] for r in sorted(rows, key=lambda r: r["round"])])
            per_client.append([(r["bytes_up"] + r["bytes_down"]) / r["clients"] for r in rows if r["round"] > 0])
            table.setdefault(method, {"seeds": [], "final_eval_loss": [], "initial_eval_loss": curves[-1][0],
                                      "bytes_up_per_client_round": [], "bytes_down_per_client_round": [],
                                      "round_s": [], "client_train_s": [], "client_project_s": [], "client_sync_s": [],
                                      "aggregate_s": []})
            t = table[method]
            t["seeds"].append(seed)
            t["final_eval_loss"].append(curves[-1][-1])
            for key, name in (("bytes_up_per_client", "bytes_up_per_client_round"),
                              ("bytes_down_per_client", "bytes_down_per_client_round"), ("round_s", "round_s"),
                              ("client_train_s", "client_train_s"), ("client_project_s", "client_project_s"),
                              ("client_sync_s", "client_sync_s"), ("aggregate_s", "aggregate_s")):
                values = [r[key] for r in rows if r["round"] > 0 and key in r]
                if values:
                    t[name].append(statistics.fmean(values))
        if not curves:
            continue
        rounds = range(len(curves[0]))
        mean = [statistics.fmean(c[i] for c in curves) for i in rounds]
        ax_loss.plot(rounds, mean, color=color, label=method)
        for c in curves:
            ax_loss.plot(rounds, c, color=color, alpha=0.25, lw=0.8)
        ax_bytes.bar(method, statistics.fmean(statistics.fmean(p) for p in per_client), color=color)
    ax_loss.set(xlabel="round", ylabel="held-out loss", title="global model, held-out chatterbot Q&A")
    ax_loss.legend()
    ax_bytes.set(yscale="log", ylabel="bytes per client-round (up + down)", title="communication")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    summary = {m: {**t, "final_eval_loss_mean": statistics.fmean(t["final_eval_loss"]),
                   "final_eval_loss_std": statistics.stdev(t["final_eval_loss"]) if len(t["final_eval_loss"]) > 1 else 0.0}
               for m, t in table.items()}
    if "ferret" in summary and "fedavg" in summary:
        f, a = summary["ferret"], summary["fedavg"]
        f_bytes = statistics.fmean(u + d for u, d in zip(f["bytes_up_per_client_round"], f["bytes_down_per_client_round"]))
        a_bytes = statistics.fmean(u + d for u, d in zip(a["bytes_up_per_client_round"], a["bytes_down_per_client_round"]))
        summary["goal"] = {"loss_ratio_ferret_over_fedavg": f["final_eval_loss_mean"] / a["final_eval_loss_mean"],
                           "bytes_ratio_ferret_over_fedavg": f_bytes / a_bytes,
                           "upload_ratio_ferret_over_fedavg": statistics.fmean(f["bytes_up_per_client_round"])
                           / statistics.fmean(a["bytes_up_per_client_round"])}
    text = json.dumps(summary, indent=1)
    print(text)
    Path(args.json).write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "exp-federated"))
    p.add_argument("--budget-min", type=float, default=18.0, help="start no new run after this many minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--plot", default=str(ROOT / "docs" / "results" / "federated.png"))
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "federated.json"))
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run (e.g. federated.rounds=3)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    report(args) if args.report else run_chunks(args)


if __name__ == "__main__":
    main()
