#!/usr/bin/env python
"""GOT-D's two costs on this machine, each against its reference, side by side in one run.

  --part ot     the OT solve, target n x pool m x d (default 5,000 x 100,000 x 384, float32,
                epsilon 0.1, L1 marginal tolerance 1e-3): ours (trainer.selection.ot, kernel held in
                memory, and lazy) against POT's dense log-domain Sinkhorn (`ot.sinkhorn(...,
                method="sinkhorn_log")`, torch backend, float32) on the same points, alternating
                ours / POT. Every solve runs in a fresh subprocess, so its peak RSS is its own.
                Reports wall time (median), iterations, peak RSS, and the agreement of the
                rankings (Spearman rho of the potentials g, overlap of the top 5 %). At
                --lazy-m (default 20,000) it also runs both lazy solvers (ours without the kernel
                in memory, POT's `ot.solve_sample(lazy=True)`), the path for pools whose kernel
                does not fit.
  --part embed  embedding throughput (chunks/s) of the packaged all-MiniLM-L6-v2 on real
                1000-character chunks (packaged corpora, max_length 256, batch 32), local engine
                and Ray Data (local Ray, 2 workers), then the scaling curve of the whole selection
                (embedding + OT) from 10k to 1M candidates: measured where stated, extrapolated
                linearly (embedding) and from measured per-iteration costs (OT) beyond.

The points: unit vectors in d dimensions drawn around 200 random cluster centres (Zipf cluster
sizes, within-cluster cosine about 0.5-0.7 as for sentence embeddings of related text), the
target from 10 of the clusters; or real embeddings with --points FILE.npz (arrays x, y).

  OMP_NUM_THREADS=2 python scripts/bench_selection.py --part ot --out docs/results/bench_selection_ot.json
  OMP_NUM_THREADS=2 python scripts/bench_selection.py --part embed --out docs/results/bench_selection_embed.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_points(n: int, m: int, d: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, 201)
    pool_cluster = rng.choice(200, size=m, p=sizes / sizes.sum())
    target_cluster = rng.choice(10, size=n)

    def draw(cluster):
        x = centres[cluster] + 0.9 * rng.normal(size=(len(cluster), d)) / np.sqrt(d)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(target_cluster), draw(pool_cluster)


# ---- one solve, in a child process ------------------------------------------------------------

def solve_child(args) -> None:
    import numpy as np
    import torch

    data = np.load(args.points)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    if args.m_limit:
        y = y[: args.m_limit]
    baseline = peak_rss_mb()
    began = time.perf_counter()
    if args.solver in ("ours", "ours-lazy"):
        from trainer.selection import ot
        res = ot.sinkhorn(x, y, args.eps, tol=args.tol, max_iter=args.max_iter,
                          max_kernel_bytes=0 if args.solver == "ours-lazy" else 8 * 2**30)
        g, iters, err, converged = res.g.numpy(), res.iterations, res.error, res.converged
        extra = {"kernel_in_memory": res.kernel_in_memory, "cost": res.transport_cost}
    elif args.solver == "pot-dense":
        import ot as pot
        M = pot.dist(x, y)  # torch float32, squared Euclidean
        a = torch.full((x.shape[0],), 1.0 / x.shape[0])
        b = torch.full((y.shape[0],), 1.0 / y.shape[0])
        # POT stops on the L2 norm of the column-marginal error, checked every 10 iterations;
        # L2 < tol / sqrt(m) guarantees our criterion, L1 < tol
        plan, log = pot.sinkhorn(a, b, M, args.eps, method="sinkhorn_log", stopThr=args.tol / y.shape[0] ** 0.5,
                                 numItermax=args.max_iter, log=True, warn=False)
        seconds = time.perf_counter() - began
        g = (args.eps * log["log_v"]).double().numpy()
        iters = int(log["niter"]) + 1
        err = max(float((plan.sum(1) - a).abs().sum()), float((plan.sum(0) - b).abs().sum()))
        converged, extra = err <= args.tol, {"stop_rule": "L2 column error < tol/sqrt(m), every 10 iterations",
                                             "solve_seconds": seconds}
    else:  # pot-lazy
        import ot as pot
        res = pot.solve_sample(x.numpy(), y.numpy(), reg=args.eps, lazy=True, batch_size=args.batch,
                               max_iter=args.max_iter, tol=args.tol)
        g = args.eps * np.asarray(res.potentials[1], dtype=np.float64)
        iters, err, converged, extra = None, None, None, {}
    seconds = extra.pop("solve_seconds", time.perf_counter() - began)
    np.save(args.result + ".g.npy", g)
    Path(args.result).write_text(json.dumps({"solver": args.solver, "seconds": seconds, "iterations": iters,
                                             "error": err, "converged": converged, "peak_rss_mb": peak_rss_mb(),
                                             "rss_before_solve_mb": baseline, **extra}))


def run_solver(solver: str, points: Path, args, m_limit: int | None = None) -> dict:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "r.json")
        cmd = [sys.executable, __file__, "--child", "--solver", solver, "--points", str(points), "--result", result,
               "--eps", str(args.eps), "--tol", str(args.tol), "--max-iter", str(args.max_iter),
               "--batch", str(args.batch)] + (["--m-limit", str(m_limit)] if m_limit else [])
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        out = json.loads(Path(result).read_text())
        out["g"] = np.load(result + ".g.npy")
    print(json.dumps({k: v for k, v in out.items() if k != "g"}), flush=True)
    return out


def agreement(g1, g2, top: float = 0.05) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    k = max(1, int(top * len(g1)))
    a, b = set(np.argsort(g1, kind="stable")[:k].tolist()), set(np.argsort(g2, kind="stable")[:k].tolist())
    return {"spearman": float(spearmanr(g1, g2).statistic), f"top{int(top * 100)}pct_overlap": len(a & b) / k}


def part_ot(args) -> dict:
    import numpy as np

    workdir = Path(tempfile.mkdtemp(prefix="bench-ot-"))
    points = workdir / "points.npz"
    if args.points:
        points = Path(args.points)
        source = f"real embeddings from {args.points}"
    else:
        x, y = make_points(args.n, args.m, args.d, seed=0)
        np.savez(points, x=x, y=y)
        source = "synthetic clustered unit vectors (see the docstring)"
    report = {"problem": {"n": args.n, "m": args.m, "d": args.d, "epsilon": args.eps, "tol": args.tol,
                          "points": source, "dtype": "float32"}, "runs": []}
    ours, pot = [], []
    for repeat in range(args.repeats):  # alternate: ours, POT, ours, POT, ...
        for name, bucket in (("ours", ours), ("pot-dense", pot)) if repeat % 2 == 0 else (("pot-dense", pot), ("ours", ours)):
            bucket.append(run_solver(name, points, args))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    report["full"] = {
        "ours_seconds_median": med(ours, "seconds"), "pot_dense_seconds_median": med(pot, "seconds"),
        "time_ratio_pot_over_ours": med(pot, "seconds") / med(ours, "seconds"),
        "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in ours), "pot_peak_rss_mb": max(r["peak_rss_mb"] for r in pot),
        "ours_iterations": [r["iterations"] for r in ours], "pot_iterations": [r["iterations"] for r in pot],
        "ours_error": [r["error"] for r in ours], "pot_error": [r["error"] for r in pot],
        **agreement(ours[0]["g"], pot[0]["g"]),
    }
    lazy = {"m": args.lazy_m}
    lazy_ours = run_solver("ours-lazy", points, args, m_limit=args.lazy_m)
    lazy_pot = run_solver("pot-lazy", points, args, m_limit=args.lazy_m)
    held = run_solver("ours", points, args, m_limit=args.lazy_m)
    lazy.update({"ours_lazy_seconds": lazy_ours["seconds"], "pot_lazy_seconds": lazy_pot["seconds"],
                 "time_ratio_pot_lazy_over_ours_lazy": lazy_pot["seconds"] / lazy_ours["seconds"],
                 "ours_lazy_iterations": lazy_ours["iterations"], "ours_lazy_peak_rss_mb": lazy_ours["peak_rss_mb"],
                 "pot_lazy_peak_rss_mb": lazy_pot["peak_rss_mb"], "ours_in_memory_seconds": held["seconds"],
                 "lazy_vs_pot_lazy": agreement(lazy_ours["g"], lazy_pot["g"]),
                 "lazy_vs_in_memory": agreement(lazy_ours["g"], held["g"])})
    report["lazy"] = lazy
    report["runs"] = [{k: v for k, v in r.items() if k != "g"} for r in ours + pot + [lazy_ours, lazy_pot, held]]
    return report


# ---- embedding -----------------------------------------------------------------------------------

def real_chunks(count: int) -> list[str]:
    from trainer.selection.chunking import chunk_documents
    from trainer.selection.corpus import read_texts

    texts: list[str] = []
    for name in ("wikipedia_excerpt", "convention_speeches", "lee_news", "rotten_tomatoes_plots", "chitchat"):
        texts += [c.text for c in chunk_documents(read_texts(f"packaged:{name}", "bench"), 1000)]
        if len(texts) >= count:
            break
    return texts[:count]


def time_embedding(texts: list[str], engine: str, workers: int) -> float:
    from trainer.selection.cache import EmbeddingCache
    from trainer.selection.config import RayOptions
    from trainer.selection.embed import EmbedderSpec, embed_texts

    spec = EmbedderSpec("packaged:all-minilm-l6-v2", 256, True, 32, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(Path(tmp), spec.key(), flush_every=4096)
        began = time.perf_counter()
        embed_texts(texts, spec, cache, engine, RayOptions(num_cpus=2, workers=workers))
        return time.perf_counter() - began


def part_embed(args) -> dict:
    texts = real_chunks(args.embed_chunks)
    report = {"chunks": len(texts), "mean_chars": sum(map(len, texts)) / len(texts), "max_length": 256,
              "batch_size": 32, "runs": []}
    local, ray_runs = [], []
    for repeat in range(args.repeats):
        order = (("local", local), ("ray", ray_runs)) if repeat % 2 == 0 else (("ray", ray_runs), ("local", local))
        for engine, bucket in order:
            seconds = time_embedding(texts, engine, workers=2)
            bucket.append(seconds)
            report["runs"].append({"engine": engine, "seconds": seconds, "chunks_per_s": len(texts) / seconds})
            print(json.dumps(report["runs"][-1]), flush=True)
    rate = len(texts) / statistics.median(local)
    report["local_chunks_per_s_median"] = rate
    report["ray_chunks_per_s_median"] = len(texts) / statistics.median(ray_runs)
    report["ray_includes"] = "starting a local Ray (2 CPUs), loading MiniLM in 2 actors, shutting Ray down"
    # the OT side of the scaling curve: measured at the sizes that fit the time budget
    import torch

    from trainer.selection import ot
    curve = []
    x, y = make_points(5000, max(args.curve_measure), 384, seed=1)
    for m in args.curve_measure:
        began = time.perf_counter()
        res = ot.sinkhorn(torch.from_numpy(x), torch.from_numpy(y[:m]), 0.1, tol=1e-3)
        seconds = time.perf_counter() - began
        curve.append({"m": m, "embed_seconds": m / rate, "embed": "extrapolated from the measured rate",
                      "ot_seconds": seconds, "iterations": res.iterations, "ot": "measured (kernel in memory)"})
        print(json.dumps(curve[-1]), flush=True)
    # beyond: the kernel no longer fits 4 GiB at m = 1M (5k x 1M x 4 B = 20 GB): lazy, one matmul per
    # block and iteration; per-iteration cost measured on a 20k slice and scaled by m
    began = time.perf_counter()
    lazy = ot.sinkhorn(torch.from_numpy(x), torch.from_numpy(y[:20000]), 0.1, tol=1e-3, max_kernel_bytes=0)
    per_iteration_per_candidate = (time.perf_counter() - began) / lazy.iterations / 20000
    iterations = max(lazy.iterations, *(c["iterations"] for c in curve))
    curve.append({"m": 1_000_000, "embed_seconds": 1_000_000 / rate, "embed": "extrapolated from the measured rate",
                  "ot_seconds": per_iteration_per_candidate * iterations * 1_000_000,
                  "ot": f"extrapolated: lazy kernel (20 GB would not fit 4 GiB), {iterations} iterations (the most "
                        f"measured), time per iteration and candidate measured at 20k"})
    report["curve"] = curve
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["ot", "embed"], default="ot")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--m", type=int, default=100_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--batch", type=int, default=2000, help="POT lazy batch size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lazy-m", type=int, default=20_000)
    p.add_argument("--points", help="npz with x (target) and y (pool) instead of synthetic points")
    p.add_argument("--embed-chunks", type=int, default=1000)
    p.add_argument("--curve-measure", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--out", help="write the report here (JSON)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--solver", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--m-limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        solve_child(args)
        return 0
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    began = time.perf_counter()
    report = part_ot(args) if args.part == "ot" else part_embed(args)
    report.update({"load_average_at_start": uptime, "threads": os.environ.get("OMP_NUM_THREADS"),
                   "cpus": os.cpu_count(), "wall_seconds": time.perf_counter() - began})
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
