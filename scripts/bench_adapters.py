"""Step time and peak memory of every adapter against LoRA at equal rank, on SmolLM2-135M.

    OMP_NUM_THREADS=1 python scripts/bench_adapters.py [--rank 8] [--batch 4] [--seq 64] [--profile]

What one step is: the training loop's update on one fixed micro-batch of packaged chit-chat
conversations (`data.max_length` = --seq, right-padded, loss on assistant tokens): forward, the
task loss, the method's extra losses (`MethodHooks.extra_losses`), backward, gradient clipping,
AdamW step, the method's step hook (`after_optimizer_step`, with any new parameters added to the
optimizer), zero_grad. Every method gets its own copy of the same base model, the same batch
and the same target modules (q/k/v/o projections) at the same rank.

Timing: all methods live in one process; each round times one step of every method, in an order
that rotates from round to round, so drifts in machine load hit all methods alike. The first
--warmup rounds are dropped; the table gives the median and interquartile range of the rest, the
ratio of medians to LoRA and the paired ratio (median over rounds of the step time over LoRA's in
the same round; the ceilings are checked on it). Memory: one subprocess per method (run alongside) loads the model,
builds the adapter, resets the kernel's peak-RSS mark (/proc/self/clear_refs) and runs the same
steps; "step peak" is the peak RSS during training minus the RSS of the built model: optimizer
state, gradients, activations and the methods' extras (BA-LoRA's teacher logits).

--profile splits a BA-LoRA step into its parts and times faster equivalents of its two dominant
terms (see `profile_balora`). Prints a table and the JSON; --json also writes the JSON to a file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adapters  # noqa: E402
import optim  # noqa: E402
from trainer.data import Collator, build_datasets  # noqa: E402
from trainer.models import load_model, load_tokenizer  # noqa: E402

MODEL = "packaged:smollm2-135m-instruct"
TASK = "causal_lm"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# step-time ceilings relative to LoRA (the methods' claims of low overhead; IAA's is measured on
# the encoder by its owner, listed here for when it runs on a causal LM)
CEILINGS = {"triadaptlora": 1.15, "balora": 1.6, "iaa": 1.25}


def method_options(name: str, rank: int) -> dict | None:
    """`adapter:` section of each method at rank `rank` on TARGETS (None: not benchmarked)."""
    common = {"target_modules": TARGETS, "dropout": 0.0}
    table = {
        "lora": {"r": rank, "alpha": 2 * rank, **common},
        "dora": {"r": rank, "alpha": 2 * rank, **common},
        # tensors of rank r (pruning only masks); every step runs the sensitivity EMAs and the
        # budget masking. target_r must be < init_r (peft's kthvalue fails at k = 0 otherwise)
        "adalora": {"init_r": rank, "target_r": max(1, 2 * rank // 3), "alpha": 2 * rank, **common},
        # init_rank = r: the rank the others have; no growth, the scoring check still runs
        "triadaptlora": {"r": rank, "init_rank": rank, "alpha": 2 * rank, **common},
        # PiSSA + all three NLG regularisers at their paper weights, constant schedules
        "balora": {"r": rank, "alpha": rank, "target_modules": TARGETS},
        "ia3": {},  # no rank: its own defaults (k, v, down projections), for reference
        "none": None,  # full fine-tuning is not an adapter
    }
    if name in table:
        return table[name]
    return {}  # a method registered later: its defaults


def supports_task(spec) -> bool:
    tasks = getattr(spec, "tasks", None)
    return tasks is None or TASK in tasks


def default_methods() -> list[str]:
    names = [n for n, spec in adapters.ADAPTERS.items()
             if supports_task(spec) and method_options(n, 8) is not None and spec.kind == "peft"]
    return ["lora"] + [n for n in names if n != "lora"]


# ----- setup ---------------------------------------------------------------------------------------
def load_base_and_batch(args):
    model_cfg = SimpleNamespace(name_or_path=MODEL, task=TASK, num_labels=2, dtype="float32", attn_implementation=None)
    tokenizer = load_tokenizer(model_cfg)
    data_cfg = SimpleNamespace(path="packaged:chitchat", format="chat", eval_path=None, eval_fraction=0.0,
                               max_length=args.seq, packing=False, max_examples=args.batch)
    train, _ = build_datasets(data_cfg, tokenizer, TASK, seed=0)
    batch = Collator(tokenizer.pad_token_id, TASK, packed=False)(train[:args.batch])
    base = load_model(model_cfg, tokenizer)
    return base, batch


class Runner:
    """One method: its model, hooks and optimizer, and the loop's step on a fixed batch."""

    def __init__(self, name: str, base, batch: dict, rank: int, total_steps: int, seed: int = 0):
        self.name = name
        spec = adapters.ADAPTERS[name]
        opts = spec.options.model_validate({"type": name, **method_options(name, rank)})
        torch.manual_seed(seed)
        began = time.perf_counter()
        self.model, self.hooks = spec.build(base, opts, adapters.BuildContext(TASK, total_steps, seed))
        self.build_s = time.perf_counter() - began
        self.model.train()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = optim.OPTIMIZERS["adamw"].build(
            named, optim.OPTIMIZERS["adamw"].options(name="adamw", lr=1e-4))
        self.batch = batch
        self.step_no = 0

    def trainable(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def step(self) -> float:
        began = time.perf_counter()
        batch = self.batch
        outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = causal_lm_loss(outputs.logits, batch["labels"])
        extras = self.hooks.extra_losses(batch, outputs, self.model)
        (loss + sum(extras.values())).backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.step_no += 1
        new = self.hooks.after_optimizer_step(self.step_no, self.model)
        if new:
            self.optimizer.add_param_group({"params": list(new)})
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ----- timing --------------------------------------------------------------------------------------
def time_alternating(runners: list[Runner], warmup: int, rounds: int) -> dict[str, list[float]]:
    times = {r.name: [] for r in runners}
    for i in range(warmup + rounds):
        k = i % len(runners)
        for runner in runners[k:] + runners[:k]:
            dt = runner.step()
            if i >= warmup:
                times[runner.name].append(dt)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    """Medians, and the ratio to LoRA twice: of the medians, and the median of the per-round
    ratios (each step against LoRA's step of the same round, which cancels slow drifts in load)."""
    ref = statistics.median(times["lora"])
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        paired = [t / r for t, r in zip(ts, times["lora"])]
        pq = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "min_s": min(ts),
                     "ratio_to_lora": statistics.median(ts) / ref, "paired_ratio": statistics.median(paired),
                     "paired_ratio_q1": pq[0], "paired_ratio_q3": pq[2], "n": len(ts), "times_s": ts}
    return out


# ----- memory --------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(args) -> dict:
    base, batch = load_base_and_batch(args)
    runner = Runner(args.memory_child, base, batch, args.rank, total_steps=10 * (args.warmup + args.rounds))
    rss_built = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    for _ in range(args.warmup + args.rounds):
        runner.step()
    peak = _status_kb("VmHWM")
    return {"built_rss_mb": rss_built / 1024, "peak_rss_mb": peak / 1024, "step_peak_mb": (peak - rss_built) / 1024,
            "trainable_params": runner.trainable()}


def start_memory_runs(args, methods: list[str]) -> dict[str, subprocess.Popen]:
    """One subprocess per method, all started now (each measures only its own peak RSS)."""
    procs = {}
    for name in methods:
        cmd = [sys.executable, __file__, "--memory-child", name, "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--warmup", "1", "--rounds", str(min(args.rounds, 3)),
               "--threads", str(args.threads)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return procs


def collect_memory_runs(procs: dict[str, subprocess.Popen]) -> dict[str, dict]:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory run of {name} failed:\n{stderr[-2000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    ref = out["lora"]["step_peak_mb"]
    for row in out.values():
        row["step_peak_ratio_to_lora"] = row["step_peak_mb"] / ref
    return out


# ----- BA-LoRA profile -----------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - began)
    return statistics.median(ts)


def gram_topk_svd_ratio(z: torch.Tensor, k: int) -> torch.Tensor:
    """-(sum of the k largest singular values) / ||Z||_F, exactly, from the M x M Gram matrix.

    For M valid tokens << V vocabulary, sigma_i^2 are the eigenvalues of Z Z^T: one M x M x V
    GEMM and an M x M eigendecomposition instead of a randomized SVD of the M x V matrix.
    """
    z = z.float()
    eig = torch.linalg.eigvalsh(z @ z.T)  # ascending
    top = eig.flip(0)[:k].clamp_min(0).sqrt().sum()
    return -top / torch.linalg.matrix_norm(z)


def fused_consistency(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean KL(softmax(Z_P/T) || softmax(Z_F/T)) through torch's kl_div (log targets)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum") / student.shape[0]


def profile_balora(runner: Runner, repeats: int) -> dict:
    """Where a BA-LoRA step goes, and what two drop-in equivalents would save."""
    from adapters.balora import regularizers as R

    hooks, model, batch, s = runner.hooks, runner.model, runner.batch, runner.hooks.settings
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = {}
    out["student_forward_s"] = _median_time(lambda: model(**inputs), repeats)
    out["teacher_forward_s"] = _median_time(lambda: hooks.initial.original_forward(**inputs), repeats)
    with torch.no_grad():
        student = hooks._rows(model(**inputs).logits, batch)
        teacher = hooks._rows(hooks.initial.original_forward(**inputs).logits, batch)
    out["rows"] = list(student.shape)

    def fwd_bwd(term):
        leaf = student.detach().clone().requires_grad_(True)
        value = term(leaf)
        value.backward()
        return value.detach(), leaf.grad

    terms = {
        "consistency": lambda z: R.consistency(z, teacher, s.temperature),
        "diversity_topk_entropy": lambda z: R.topk_entropy_diversity(z, s.entropy_top_k),
        "svd_randomized": lambda z: R.svd_ratio(z, s.svd_top_k, s.svd_normalizer, s.randomized_svd_above),
        "svd_exact_svdvals": lambda z: R.svd_ratio(z, s.svd_top_k, s.svd_normalizer, None),
        # candidates (same quantities, other algorithms)
        "consistency_kl_div": lambda z: fused_consistency(z, teacher, s.temperature),
        "svd_exact_gram": lambda z: gram_topk_svd_ratio(z, s.svd_top_k),
    }
    for name, term in terms.items():
        out[f"{name}_fwd_bwd_s"] = _median_time(lambda term=term: fwd_bwd(term), repeats)
    values = {name: float(fwd_bwd(term)[0]) for name, term in terms.items()}
    out["values"] = values
    g_ref, g_new = fwd_bwd(terms["consistency"])[1], fwd_bwd(terms["consistency_kl_div"])[1]
    out["kl_div_matches"] = bool(torch.allclose(g_ref, g_new, rtol=1e-4, atol=1e-9))
    g_exact, g_gram = fwd_bwd(terms["svd_exact_svdvals"])[1], fwd_bwd(terms["svd_exact_gram"])[1]
    out["gram_matches_exact"] = bool(abs(values["svd_exact_gram"] - values["svd_exact_svdvals"]) < 1e-4
                                     and torch.allclose(g_exact, g_gram, rtol=1e-3, atol=1e-7))
    out["randomized_rel_error"] = abs(values["svd_randomized"] / values["svd_exact_svdvals"] - 1)
    return out


# ----- report --------------------------------------------------------------------------------------
def table(result: dict) -> str:
    t, m = result["time"], result.get("memory", {})
    lines = [f"{'method':14} {'params':>10} {'median s':>9} {'IQR s':>15} {'x LoRA':>7} {'paired x LoRA (IQR)':>20} "
             f"{'ceiling':>8} {'step peak MB':>12} {'x LoRA':>7} {'build s':>8}"]
    for name, row in t.items():
        ceiling = CEILINGS.get(name)
        verdict = "" if ceiling is None else f"{ceiling:.2f}{' ok' if row['paired_ratio'] <= ceiling else ' OVER'}"
        mem = m.get(name, {})
        peak = f"{mem['step_peak_mb']:12.0f} {mem['step_peak_ratio_to_lora']:7.2f}" if mem else f"{'-':>12} {'-':>7}"
        paired = f"{row['paired_ratio']:.2f} ({row['paired_ratio_q1']:.2f}-{row['paired_ratio_q3']:.2f})"
        lines.append(f"{name:14} {result['trainable_params'][name]:>10,} {row['median_s']:9.3f} "
                     f"{row['q1_s']:7.3f}-{row['q3_s']:<7.3f} {row['ratio_to_lora']:7.2f} {paired:>20} {verdict:>8} "
                     f"{peak} {result['build_s'][name]:8.2f}")
    return "\n".join(lines)


def profile_table(p: dict) -> str:
    rows = [(k.removesuffix("_s"), v) for k, v in p.items() if k.endswith("_s")]
    lines = [f"BA-LoRA step parts ({p['rows'][0]} valid tokens x {p['rows'][1]} vocab):"]
    lines += [f"  {k:36} {v * 1000:8.1f} ms" for k, v in rows]
    lines.append(f"  kl_div gives the same gradient: {p['kl_div_matches']}; Gram top-k equals exact svdvals: "
                 f"{p['gram_matches_exact']}; randomized SVD ratio rel. error: {p['randomized_rel_error']:.2e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", help="comma-separated adapter types (default: every registered adapter for causal LM)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="data.max_length of the micro-batch")
    p.add_argument("--warmup", type=int, default=2, help="rounds dropped before timing")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of every method each)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--profile", action="store_true", help="split a BA-LoRA step into its parts")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0

    methods = args.methods.split(",") if args.methods else default_methods()
    if "lora" not in methods:
        methods = ["lora"] + methods
    # the memory runs go alongside the timing: each reads only its own process's peak, and the
    # timing rotates the method order, so their load falls on every method alike
    memory_runs = None if args.no_memory else start_memory_runs(args, methods)
    base, batch = load_base_and_batch(args)
    total_steps = 10 * (args.warmup + args.rounds)  # AdaLoRA's budget schedule needs a horizon past the bench
    runners = [Runner(name, copy.deepcopy(base), batch, args.rank, total_steps) for name in methods]
    del base
    times = time_alternating(runners, args.warmup, args.rounds)
    result = {
        "config": {"model": MODEL, "rank": args.rank, "target_modules": TARGETS, "batch": args.batch,
                   "seq": args.seq, "input_tokens": int(batch["attention_mask"].sum()),
                   "loss_tokens": int((batch["labels"][:, 1:] != -100).sum()), "warmup": args.warmup,
                   "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
                   "options": {n: method_options(n, args.rank) for n in methods}},
        "trainable_params": {r.name: r.trainable() for r in runners},
        "build_s": {r.name: r.build_s for r in runners},
        "time": summarise(times),
        "ceilings": {k: v for k, v in CEILINGS.items() if k in methods},
    }
    if args.profile and "balora" in methods:
        result["balora_profile"] = profile_balora(next(r for r in runners if r.name == "balora"), repeats=5)
    del runners
    if memory_runs is not None:
        result["memory"] = collect_memory_runs(memory_runs)
    print(table(result))
    if "balora_profile" in result:
        print(profile_table(result["balora_profile"]))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
