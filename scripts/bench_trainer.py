#!/usr/bin/env python
"""Throughput and memory: our training loop vs HF `transformers.Trainer` + peft LoRA.

Both sides train LoRA (r 8, alpha 16, dropout 0.05, q/k/v/o) on the packaged SmolLM2-135M-Instruct,
chat SFT on packaged:chitchat, with AdamW (same lr, betas, eps, no weight decay), constant LR, grad
clipping at 1.0, the same batch size, max_length and number of steps. Variants:

  padded   ours (data.packing=false) vs HF on IDENTICAL micro-batches: the HF child builds the same
           examples with our `build_datasets`, orders them with our `MicroBatchStream` (same seed),
           and HF reads them with `train_sampling_strategy="sequential"` through our `Collator`, so
           every micro-batch is the same tensor on both sides (checked: each side hashes its
           batches and the parent compares the hashes).
  packed   ours with data.packing=true (same max_length, same batch size in rows) vs the same HF
           padded runs; the fair metric is loss tokens/s, since packing removes padding.
  hfpacked (optional) HF fed exactly our packed rows (position_ids, no attention mask): isolates
           loop overhead under packing.

A "loss token" is a label position that enters the shifted next-token loss: (labels[:, 1:] != -100).
Each run is its own subprocess (peak RSS = that child's ru_maxrss, from os.wait4). The step time of
both sides is measured the same way, as the wall interval between consecutive optimizer-step ends
(ours: `Tracker.advance`, called right after `zero_grad`; HF: `on_step_end`, called right after
`zero_grad`), so it includes batch building, forward, backward, clipping and the optimizer step;
the first `--warmup` steps are excluded, and each run reports the MEDIAN per-step loss-tokens/s.
Ours is the real `trainer.loop.train(cfg)`: the harness only wraps `Tracker.advance` and
the loop's per-micro-batch loss-unit count to take timestamps and hash batches; it does not re-implement anything.

  python scripts/bench_trainer.py     # defaults: bs 4, len 128, 8 steps (3 warm-up), 3 repeats
  python scripts/bench_trainer.py --variants padded,packed,hfpacked --out runs/bench/x.json
  python scripts/bench_trainer.py --device cuda --precision bf16 --threads 4 --steps 40 --warmup 10

Threads: OMP/MKL_NUM_THREADS and torch.set_num_threads are set to --threads (2) in every child, and
OMP_WAIT_POLICY to --omp-wait-policy (PASSIVE), identically for both sides. With --device cuda
both sides train on the GPU and each child also reports torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "smollm2-lora.yaml"


# ---- shared by both children -------------------------------------------------------------------

def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _config(spec: dict, packing: bool, output_dir: str, extra: list[str] = ()):
    from trainer.config import load_config

    overrides = [
        f"data.max_length={spec['max_length']}", f"data.packing={str(packing).lower()}",
        "data.eval_fraction=0", f"data.max_examples={spec['max_examples']}",
        f"train.max_steps={spec['steps']}", f"train.batch_size={spec['batch_size']}",
        "train.gradient_accumulation_steps=1", "train.lr_schedule=constant", "train.warmup_steps=0",
        "train.max_grad_norm=1.0", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
        "train.sample_prompts=[]", f"train.seed={spec['seed']}", f"train.output_dir={output_dir}",
        "train.overwrite=true", "tracking.wandb=false", f"model.name_or_path={spec['model']}",
    ]
    return load_config(RECIPE, overrides + list(spec.get("both_overrides", [])) + list(extra))


def _fingerprint(batch: dict) -> str:
    h = hashlib.sha1()
    for key in sorted(batch):
        t = batch[key]
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _batch_stats(batch: dict) -> dict:
    from trainer.data import count_loss_tokens

    stats = {"loss_tokens": count_loss_tokens(batch["labels"]), "positions": int(batch["input_ids"].numel()),
             "fp": _fingerprint(batch), **_attention_pairs(batch)}
    if "attention_mask" in batch:
        stats["input_tokens"] = int(batch["attention_mask"].sum())
    return stats


def _attention_pairs(batch: dict) -> dict:
    """Causal (query, key) pairs per micro-batch: `rows` when every row is one attention block
    (padded rows, or packed rows under a block-diagonal mask), `documents` when each packed
    document is its own block (sdpa_varlen, flash-attention's varlen kernel)."""
    rows, width = batch["input_ids"].shape
    out = {"pairs_rows": rows * width * (width + 1) // 2}
    if "attention_mask" in batch:  # padded rows: run padding-free, each row's real tokens are a document
        out["pairs_documents"] = sum(n * (n + 1) // 2 for n in batch["attention_mask"].sum(1).tolist())
    if "position_ids" in batch:
        from trainer.varlen_attention import document_sizes

        sizes = document_sizes(batch["position_ids"]) or [width] * rows
        out["pairs_documents"] = sum(n * (n + 1) // 2 for n in sizes)
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device_peak() -> dict:
    """Peak GPU memory of this process (allocated by tensors, and reserved by the caching allocator)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "gpu_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def _vm(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- child: our loop ---------------------------------------------------------------------------

def _hook_units(record) -> None:
    """Call `record(batch)` on every training micro-batch of our loop (the host batch, before the
    forward): wraps the causal-LM task's `units`, which the loop calls once per micro-batch."""
    from trainer.tasks import TASKS

    cls = TASKS["causal_lm"]
    real = cls.units

    def units(self, batch):
        record(batch)
        return real(self, batch)

    cls.units = units


def child_ours(spec: dict, result_path: Path) -> None:
    _set_threads(spec["threads"])
    import trainer.loop as loop
    from trainer.tracking import Tracker

    marks, batches, at_start = [], [], {}
    real_advance = Tracker.advance

    def record(mb):
        if not at_start:
            at_start.update(rss_mb=_vm("VmRSS"), hwm_mb=_vm("VmHWM"), threads=_threads())
        batches.append(_batch_stats(mb))

    def advance(self):  # called once per optimizer step, right after zero_grad
        marks.append((time.perf_counter(), time.process_time()))
        return real_advance(self)

    notes, real_write = [], Tracker.write

    def write(self, text):  # the loop's notes: which loss path and attention ran
        notes.append(text)
        return real_write(self, text)

    _hook_units(record)
    Tracker.advance = advance
    Tracker.write = write
    run_dir = Path(spec["workdir"]) / f"ours-{spec['tag']}"
    cfg = _config(spec, spec["packing"], str(run_dir), spec.get("ours_overrides", []))
    loop.train(cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in metrics if "tokens_per_s" in m]
    _write_result(result_path, marks, batches, at_start,
                  losses=[m["loss"] for m in steps],
                  extra={"loop_tokens_per_s": [m["tokens_per_s"] for m in steps],
                         "loop_peak_rss_mb": steps[-1]["peak_rss_mb"] if steps else None,
                         "notes": [n for n in notes if n.startswith(("loss:", "attention:", "padded batches"))]})
    shutil.rmtree(run_dir, ignore_errors=True)


# ---- child: HF Trainer -------------------------------------------------------------------------

def child_hf(spec: dict, result_path: Path) -> None:
    _set_threads(spec["threads"])
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import adapters
    from adapters.lora import lora_config
    from trainer.data import Collator, build_datasets
    from trainer.models import load_model, load_tokenizer
    from trainer.sampling import MicroBatchStream

    out_dir = Path(spec["workdir"]) / f"hf-{spec['tag']}"
    cfg = _config(spec, spec["packing"], str(out_dir))
    t = cfg.train
    # Same order of work as trainer.loop.train: seed, tokenizer, data, model, adapter.
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_set, _ = build_datasets(cfg.data, tokenizer, cfg.model.task, t.seed)
    stream = MicroBatchStream(len(train_set), t.batch_size, t.seed)
    ordered = [train_set[i] for _ in range(t.max_steps) for i in stream.next_indices()]
    model = load_model(cfg.model, tokenizer)
    ctx = adapters.BuildContext(cfg.model.task, t.max_steps, t.seed)
    model = get_peft_model(model, lora_config(cfg.adapter, ctx))  # the LoraConfig our adapter builds

    collate = Collator(tokenizer.pad_token_id, cfg.model.task, packed=cfg.data.packing)
    marks, batches, at_start = [], [], {}

    def collator(examples):
        batch = collate(examples)
        batches.append(_batch_stats(batch))
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            at_start.update(rss_mb=_vm("VmRSS"), hwm_mb=_vm("VmHWM"), threads=_threads())

        def on_step_end(self, args, state, control, **kw):  # right after zero_grad
            marks.append((time.perf_counter(), time.process_time()))

    o = cfg.optim
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=1,
        max_steps=t.max_steps, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_epsilon=o.eps, optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=t.max_grad_norm, seed=t.seed, use_cpu=spec["device"] == "cpu",
        bf16=spec["precision"] == "bf16",
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, logging_steps=1, eval_strategy="no", save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, train_dataset=ordered, data_collator=collator,
                      processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out_dir / "adapter"))  # as our loop saves its final adapter + tokenizer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _write_result(result_path, marks, batches, at_start, losses=losses, extra={})
    shutil.rmtree(out_dir, ignore_errors=True)


def _write_result(path: Path, marks, batches, at_start, losses, extra) -> None:
    result = {"marks": marks, "batches": batches, "losses": losses, "at_train_start": at_start,
              "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **_device_peak(), **extra}
    path.write_text(json.dumps(result))


# ---- roofline ----------------------------------------------------------------------------------

GEMMS = {"square": (2048, 2048, 2048), "model": (2048, 576, 1536)}  # (m, k, n); "model": an MLP matmul of a step


def child_peak(spec: dict, result_path: Path) -> None:
    """fp32 matmul GFLOP/s on the benchmark's threads: best and median of 10 timed products."""
    _set_threads(spec["threads"])
    import torch

    out = {}
    for name, (m, k, n) in GEMMS.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            began = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - began)
        out[name] = {"best_gflops": 2 * m * k * n / min(times) / 1e9,
                     "median_gflops": 2 * m * k * n / statistics.median(times) / 1e9}
    result_path.write_text(json.dumps(out))


class FlopModel:
    """Forward + backward FLOPs of one training step of the benchmarked model (matmuls only).

    Per position: the decoder's linear layers forward (2 per weight) and their input gradients
    (2 per weight; the base weights are frozen), LoRA's forward (2) and both of its gradients (4);
    attention: QK^T and AV forward (4 x heads x head_dim per causal pair) and twice that backward;
    the output layer (2 x hidden x vocab forward, as much for the input gradient, the tied matrix
    being frozen) at every row it is applied to: every position on HF's side, only the loss
    positions on ours when it takes that path. Causal pairs are counted per attention block: a
    row (padded rows, or packed rows under a block mask) or a document (sdpa_varlen, and the real
    tokens of a padded row run padding-free, when positions count only those tokens).
    """

    def __init__(self, config, lora_r: int, lora_targets: list[str]):
        h, i, hd = config.hidden_size, config.intermediate_size, getattr(config, "head_dim", None)
        nh, nkv = config.num_attention_heads, config.num_key_value_heads
        hd = hd or h // nh
        shapes = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nh * hd, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        self.layers = config.num_hidden_layers
        self.linear = sum(a * b for a, b in shapes.values())
        self.lora = sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in lora_targets)
        self.attn_width = nh * hd
        self.head = h * config.vocab_size

    def step(self, batch: dict, head_rows: str, blocks: str, padding_free: bool = False) -> float:
        positions = batch["input_tokens"] if padding_free else batch["positions"]
        body = positions * self.layers * (4 * self.linear + 6 * self.lora)
        attention = self.layers * 3 * 4 * self.attn_width * batch[f"pairs_{blocks}"]
        head = 4 * self.head * (batch["loss_tokens"] if head_rows == "loss" else positions)
        return float(body + attention + head)


def side_flops(raw: dict, flop_model: FlopModel | None):
    """(batch stats -> FLOPs of that step) for a run, from the paths it reports having taken."""
    if flop_model is None:
        return None
    notes = " ".join(raw.get("notes", []))
    head_rows = "loss" if "loss positions" in notes else "all"
    per_document = "sdpa_varlen" in notes or "flash_attention" in notes
    padding_free = "padding-free" in notes

    def flops(batch: dict) -> float:
        if "input_tokens" in batch:  # padded rows: one block each, or their real tokens when padding-free
            return flop_model.step(batch, head_rows, "documents" if padding_free else "rows", padding_free)
        return flop_model.step(batch, head_rows, "documents" if per_document else "rows")
    return flops


# ---- parent ------------------------------------------------------------------------------------

def run_peak(spec: dict, workdir: Path) -> dict:
    """The fp32 matmul roofline, measured in a child with the same threads and environment."""
    result_path = workdir / "peak.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "CUDA_VISIBLE_DEVICES": ""}
    if spec.get("omp_wait_policy"):
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "peak", "--spec", json.dumps(spec),
           "--result", str(result_path)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return json.loads(result_path.read_text())


def make_flop_model(spec: dict) -> FlopModel | None:
    """The FLOP model of the benchmarked architecture and adapter (None if it is not Llama-like)."""
    from transformers import AutoConfig

    from trainer.config import load_config
    from trainer.models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(spec["model"]))
        adapter = load_config(RECIPE).adapter
        return FlopModel(config, adapter.r, list(adapter.target_modules))
    except (OSError, ValueError, AttributeError, KeyError) as e:
        print(f"no FLOP model: {e}", flush=True)
        return None


SIDES = {  # name -> (child kind, packing)
    "ours-padded": ("ours", False),
    "hf-padded": ("hf", False),
    "ours-packed": ("ours", True),
    "hf-packed": ("hf", True),
}
VARIANTS = {  # name -> (ours side, HF side)
    "padded": ("ours-padded", "hf-padded"),
    "packed": ("ours-packed", "hf-padded"),
    "hfpacked": ("ours-packed", "hf-packed"),
}


def run_child(side: str, spec: dict, workdir: Path, index: int, flop_model: FlopModel | None = None) -> dict:
    kind, packing = SIDES[side]
    child_spec = {**spec, "packing": packing, "tag": f"{side}-{index}", "workdir": str(workdir)}
    result_path = workdir / f"{side}-{index}.json"
    log_path = workdir / f"{side}-{index}.log"
    # the repo first, then any PYTHONPATH the caller set (e.g. packages installed beside the system ones)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath, "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    if spec["precision"] == "bf16":  # ours: accelerate autocasts; HF: TrainingArguments(bf16=True)
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if spec.get("omp_wait_policy"):
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(child_spec),
           "--result", str(result_path)]
    began = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{side} run {index} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    raw = json.loads(result_path.read_text())
    return summarise_run(side, raw, usage.ru_maxrss / 1024, wall, spec["warmup"], side_flops(raw, flop_model))


def summarise_run(side: str, raw: dict, peak_rss_mb: float, wall: float, warmup: int, flops=None) -> dict:
    marks, batches = raw["marks"], raw["batches"]
    n = len(marks)
    assert len(batches) == n, f"{side}: {len(batches)} batches for {n} steps"
    # step k (1-based) lasts from the end of step k-1 to the end of step k; steps 1..warmup are dropped
    steady = [k for k in range(max(2, warmup + 1), n + 1)]
    rates, cpu_rates, step_s, flop_rates = [], [], [], []
    for k in steady:
        dt = marks[k - 1][0] - marks[k - 2][0]
        dcpu = marks[k - 1][1] - marks[k - 2][1]
        tokens = batches[k - 1]["loss_tokens"]
        rates.append(tokens / dt)
        cpu_rates.append(tokens / dcpu)
        step_s.append(dt)
        if flops:
            flop_rates.append(flops(batches[k - 1]) / dt)
    total_tokens = sum(batches[k - 1]["loss_tokens"] for k in steady)
    row = {
        "side": side, "steps": n, "steady_steps": len(steady),
        "median_loss_tokens_per_s": statistics.median(rates),
        "pooled_loss_tokens_per_s": total_tokens / sum(step_s),
        "median_loss_tokens_per_cpu_s": statistics.median(cpu_rates),
        "median_step_s": statistics.median(step_s),
        "per_step_loss_tokens_per_s": rates,
        "loss_tokens_per_step": statistics.mean(b["loss_tokens"] for b in batches),
        "positions_per_step": statistics.mean(b["positions"] for b in batches),
        "peak_rss_mb": peak_rss_mb,
        "gpu_peak_allocated_mb": raw.get("gpu_peak_allocated_mb"),
        "gpu_peak_reserved_mb": raw.get("gpu_peak_reserved_mb"),
        "rss_at_train_start_mb": raw["at_train_start"].get("rss_mb"),
        "torch_threads": raw["at_train_start"].get("threads"),
        "loadavg_1min_after": os.getloadavg()[0],
        "wall_s": wall,
        "losses": raw["losses"],
        "notes": raw.get("notes", []),
        "fingerprints": [b["fp"] for b in batches],
    }
    if flops:
        row["median_model_gflops"] = statistics.median(flop_rates) / 1e9
        row["model_gflop_per_position"] = statistics.mean(flops(b) / b["positions"] for b in batches) / 1e9
    if all("input_tokens" in b for b in batches):
        row["input_tokens_per_step"] = statistics.mean(b["input_tokens"] for b in batches)
    if "loop_tokens_per_s" in raw:  # the loop's own metric (same definition), as a cross-check
        reported = raw["loop_tokens_per_s"]
        row["loop_reported_median_tokens_per_s"] = statistics.median(reported[len(reported) - len(steady):])
    return row


def summarise(runs: list[dict], variants: list[str]) -> dict:
    by_side: dict[str, list[dict]] = {}
    for r in runs:
        by_side.setdefault(r["side"], []).append(r)
    med = lambda side, key: statistics.median(r[key] for r in by_side[side])  # noqa: E731
    keys = ["median_loss_tokens_per_s", "median_loss_tokens_per_cpu_s", "median_step_s", "peak_rss_mb",
            "rss_at_train_start_mb", "loss_tokens_per_step", "positions_per_step"]
    if runs[0].get("gpu_peak_allocated_mb") is not None:
        keys += ["gpu_peak_allocated_mb", "gpu_peak_reserved_mb"]
    if all("median_model_gflops" in r for r in runs):
        keys += ["median_model_gflops", "model_gflop_per_position"]
    sides = {s: {k: med(s, k) for k in keys} for s in by_side}
    for s in sides:
        sides[s]["runs_loss_tokens_per_s"] = [round(r["median_loss_tokens_per_s"], 2) for r in by_side[s]]
        sides[s]["runs_peak_rss_mb"] = [round(r["peak_rss_mb"], 1) for r in by_side[s]]
        sides[s]["notes"] = by_side[s][0]["notes"]
    out = {"sides": sides, "variants": {}}
    for v in variants:
        ours, hf = VARIANTS[v]
        paired = [o["median_loss_tokens_per_s"] / h["median_loss_tokens_per_s"]
                  for o, h in zip(by_side[ours], by_side[hf])]
        out["variants"][v] = {
            "ours": ours, "hf": hf,
            "speed_ratio": sides[ours]["median_loss_tokens_per_s"] / sides[hf]["median_loss_tokens_per_s"],
            "speed_ratio_paired_runs": paired,
            "cpu_speed_ratio": sides[ours]["median_loss_tokens_per_cpu_s"] / sides[hf]["median_loss_tokens_per_cpu_s"],
            "rss_ratio": sides[ours]["peak_rss_mb"] / sides[hf]["peak_rss_mb"],
        }
        if "gpu_peak_allocated_mb" in sides[ours]:
            out["variants"][v]["gpu_mem_ratio"] = (sides[ours]["gpu_peak_allocated_mb"]
                                                   / sides[hf]["gpu_peak_allocated_mb"])
        if v in ("padded", "hfpacked"):  # identical batches: prove it, and pair the steps
            same = all(o["fingerprints"] == h["fingerprints"] for o, h in zip(by_side[ours], by_side[hf]))
            out["variants"][v]["identical_batches"] = same
            if same:  # step k of run i holds the same batch on both sides
                out["variants"][v]["speed_ratio_paired_steps"] = statistics.median(
                    a / b for o, h in zip(by_side[ours], by_side[hf])
                    for a, b in zip(o["per_step_loss_tokens_per_s"], h["per_step_loss_tokens_per_s"]))
            out["variants"][v]["step1_loss"] = {"ours": by_side[ours][0]["losses"][:1],
                                                "hf": by_side[hf][0]["losses"][:1]}
            # same batches, same seeds: every step's loss should agree (the computation is the same)
            out["variants"][v]["max_abs_loss_diff"] = max(
                abs(a - b) for o, h in zip(by_side[ours], by_side[hf]) for a, b in zip(o["losses"], h["losses"]))
    return out


def print_table(summary: dict, spec: dict) -> None:
    print(f"\nSmolLM2-135M-Instruct LoRA r8 q/k/v/o, packaged:chitchat (chat), bs {spec['batch_size']}, "
          f"max_length {spec['max_length']}, {spec['steps']} steps (first {spec['warmup']} excluded), "
          f"{spec['repeats']} repeats, {spec['threads']} threads, "
          f"OMP_WAIT_POLICY={spec.get('omp_wait_policy') or 'unset'}, {spec['precision']} {spec['device']}, "
          f"model {spec['model']}")
    gpu = "gpu_peak_allocated_mb" in next(iter(summary["sides"].values()))
    peak = summary.get("peak_gflops")
    hdr = (f"{'side':<12} {'loss tok/s':>10} {'tok/cpu-s':>10} {'step s':>7} {'loss tok/step':>13} "
           f"{'positions/step':>14} {'peak RSS MB':>11}" + (f" {'peak GPU MB':>11}" if gpu else "") + "  runs (tok/s)")
    print(hdr)
    print("-" * len(hdr))
    for side, s in summary["sides"].items():
        print(f"{side:<12} {s['median_loss_tokens_per_s']:>10.2f} {s['median_loss_tokens_per_cpu_s']:>10.2f} "
              f"{s['median_step_s']:>7.3f} {s['loss_tokens_per_step']:>13.1f} {s['positions_per_step']:>14.1f} "
              f"{s['peak_rss_mb']:>11.0f}" + (f" {s['gpu_peak_allocated_mb']:>11.0f}" if gpu else "")
              + f"  {s['runs_loss_tokens_per_s']}")
    if peak and all("median_model_gflops" in s for s in summary["sides"].values()):
        best = peak["square"]["best_gflops"]
        print(f"\nroofline: fp32 matmul {best:.1f} GFLOP/s best ({peak['square']['median_gflops']:.1f} median) on "
              f"2048^3, {peak['model']['best_gflops']:.1f} on the model's 2048x576x1536 MLP matmul; {spec['threads']} threads")
        for side, s in summary["sides"].items():
            print(f"  {side:<12} {s['median_model_gflops']:6.1f} model GFLOP/s = {100 * s['median_model_gflops'] / best:4.1f}% "
                  f"of peak ({s['model_gflop_per_position']:.3f} GFLOP per position, fwd+bwd)  {'; '.join(s['notes'])}")
    print()
    hdr = (f"{'variant':<9} {'ours/HF tok/s':>13} {'paired runs':>22} {'paired steps':>12} {'ours/HF tok/cpu-s':>17} "
           f"{'ours/HF RSS':>11}" + (f" {'ours/HF GPU':>11}" if gpu else "") + "  batches")
    print(hdr)
    print("-" * len(hdr))
    for v, r in summary["variants"].items():
        paired = "/".join(f"{x:.2f}" for x in r["speed_ratio_paired_runs"])
        ident = {True: "identical", False: "DIFFER"}.get(r.get("identical_batches"), "-")
        steps = f"{r['speed_ratio_paired_steps']:.3f}" if "speed_ratio_paired_steps" in r else "-"
        print(f"{v:<9} {r['speed_ratio']:>13.3f} {paired:>22} {steps:>12} {r['cpu_speed_ratio']:>17.3f} "
              f"{r['rss_ratio']:>11.3f}" + (f" {r['gpu_mem_ratio']:>11.3f}" if gpu else "") + f"  {ident}"
              + (f", max |loss ours - HF| {r['max_abs_loss_diff']:.2e}" if "max_abs_loss_diff" in r else ""))


def merge(paths: list[str], out: Path) -> None:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("steps", "batch_size", "max_length", "warmup", "threads", "model", "device", "precision", "variants",
            "ours_overrides", "both_overrides")
    for part, path in zip(parts[1:], paths[1:]):
        differ = [k for k in same if part["config"].get(k) != parts[0]["config"].get(k)]
        if differ:
            raise SystemExit(f"{path}: another configuration ({', '.join(differ)}) than {paths[0]}")
    runs = [r for part in parts for r in part["runs"]]
    spec = {**parts[0]["config"], "repeats": sum(part["config"]["repeats"] for part in parts)}
    summary = summarise(runs, spec["variants"])
    summary["peak_gflops"] = parts[0]["summary"].get("peak_gflops")
    result = {"config": spec, "merged_from": paths, "machines": [part["machine"] for part in parts],
              "summary": summary, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(summary, spec)
    print(f"\nwrote {out} ({len(runs)} runs from {len(paths)} files)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the medians")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for both sides; PASSIVE keeps idle OpenMP threads from spinning, "
                        "which on a shared, oversubscribed CPU otherwise dominates (and randomises) step "
                        "times; '' leaves it unset")
    p.add_argument("--max-examples", type=int, default=512, help="data.max_examples (documents before packing)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: both sides train on the GPU and the GPU's peak allocated memory is reported too")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on both sides (accelerate's mixed precision; TrainingArguments(bf16=True))")
    p.add_argument("--model", default="packaged:smollm2-135m-instruct",
                   help="model.name_or_path for both sides (a folder with the same architecture works too)")
    p.add_argument("--variants", default="padded,packed", help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "bench_trainer.json"))
    p.add_argument("--ours-overrides", default="",
                   help="space-separated config overrides for our side only, e.g. 'train.logits=full' (the "
                        "full-logits path) or 'train.compile=true'")
    p.add_argument("--both-overrides", default="",
                   help="space-separated config overrides for both sides, e.g. 'adapter.dropout=0' (no dropout "
                        "draws, so the two sides' losses can be compared step by step)")
    p.add_argument("--start-repeat", type=int, default=0,
                   help="index of the first repeat: a benchmark split into invocations continues the ABBA order")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="summarise the runs of earlier --out files of the same configuration together (a long "
                        "benchmark split into several invocations) and write the result to --out")
    p.add_argument("--child", choices=["ours", "hf", "peak"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        {"ours": child_ours, "hf": child_hf, "peak": child_peak}[a.child](json.loads(a.spec), Path(a.result))
        return

    if a.merge:
        merge(a.merge, Path(a.out))
        return
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choices: {', '.join(VARIANTS)}")
    if a.steps < a.warmup + 2:
        p.error("--steps must leave at least 2 steps after --warmup")
    spec = {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "repeats": a.repeats,
            "warmup": a.warmup, "threads": a.threads, "omp_wait_policy": a.omp_wait_policy,
            "max_examples": a.max_examples, "seed": a.seed, "device": a.device, "precision": a.precision,
            "model": a.model, "ours_overrides": a.ours_overrides.split(),
            "both_overrides": a.both_overrides.split()}
    # One repeat runs each side once, ours and HF interleaved, so every HF run sits next to the ours
    # runs it is compared with: padded -> ours-padded, hf-padded, ours-packed(, hf-packed). Every
    # other repeat runs them in reverse (ABBA), so a drift or a first-run effect favours neither side.
    order = []
    for v in variants:
        for side in VARIANTS[v]:
            if side not in order:
                order.append(side)
    workdir = Path(tempfile.mkdtemp(prefix="bench_trainer."))
    runs = []
    began = time.perf_counter()
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at start: {' '.join(uptime)}", flush=True)
    try:
        peak = run_peak(spec, workdir) if a.device == "cpu" else None
        if peak:
            print(f"fp32 matmul: {peak['square']['best_gflops']:.1f} GFLOP/s best on 2048^3", flush=True)
        flop_model = make_flop_model(spec)
        for rep in range(a.start_repeat, a.start_repeat + a.repeats):
            for side in (order if rep % 2 == 0 else order[::-1]):
                r = run_child(side, spec, workdir, rep, flop_model)
                runs.append(r)
                print(f"[{time.perf_counter() - began:6.0f}s] repeat {rep + 1}/{a.start_repeat + a.repeats} {side:<12} "
                      f"median {r['median_loss_tokens_per_s']:7.2f} loss tok/s  step {r['median_step_s']:.3f}s  "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB"
                      + (f"  peak GPU {r['gpu_peak_allocated_mb']:.0f} MB" if r["gpu_peak_allocated_mb"] else "")
                      + f"  (run {r['wall_s']:.0f}s, load {r['loadavg_1min_after']:.1f})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(runs, variants)
    summary["peak_gflops"] = peak
    import platform

    import peft
    import torch
    import transformers

    result = {
        "config": {**spec, "variants": variants, "data": "packaged:chitchat",
                   "format": "chat", "adapter": "lora r=8 alpha=16 dropout=0.05 q/k/v/o", "optimizer":
                   "AdamW lr 1e-3 betas (0.9,0.999) eps 1e-8 wd 0, constant LR, clip 1.0"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                    "loadavg_at_start": [float(x) for x in uptime], "loadavg_at_end": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None},
        "summary": summary,
        "runs": runs,
        "total_wall_s": time.perf_counter() - began,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"config": result["config"], "summary": summary}, indent=1))
    print_table(summary, spec)
    print(f"\nwrote {out}; total {result['total_wall_s']:.0f}s")


if __name__ == "__main__":
    main()
