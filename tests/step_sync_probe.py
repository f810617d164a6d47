"""Run one `train_step` on each of two real DDP processes (accelerate's debug_launcher: CPU,
gloo) and report every tensor value that trainer/job.py itself read back to the host.

On a GPU each such read (int(t), float(t), bool(t), t.item(), t.tolist()) makes the host wait for
the device, so the step must make none. On the CPU the reads cost nothing but still happen, so
they are caught here by wrapping those conversions and looking at who called them.
Writes one JSON file per process, OUT_DIR/rank-N.json: {"rank", "reads": ["job.py:LINE <conversion>", ...], "loss"}.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from accelerate import debug_launcher
from accelerate.utils import set_seed

ROOT = Path(__file__).resolve().parents[1]
CONVERSIONS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")


def _watch(reads: list[str]) -> dict:
    """Record conversions whose direct caller is trainer/job.py; returns the originals."""
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
    for name in CONVERSIONS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.endswith(str(Path("trainer") / "job.py")):
                reads.append(f"job.py:{caller.lineno} {_name}")
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, wrapped)
    return originals


def worker(out_dir: str) -> None:
    from trainer.config import load_config
    from trainer.distributed import make_accelerator
    from trainer.job import build_job, train_step
    from trainer.sampling import MicroBatchStream

    cfg = load_config(ROOT / "configs" / "tiny-lora.yaml", [f"train.output_dir={out_dir}", "train.batch_size=2",
                      "train.gradient_accumulation_steps=2", "data.max_length=32", "data.max_examples=16"])
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    job = build_job(cfg, accelerator)
    stream = MicroBatchStream(len(job.train_set), 2, cfg.train.seed, accelerator.process_index, accelerator.num_processes)
    micro = [job.task.collate([job.train_set[i] for i in stream.next_indices()]) for _ in range(2)]
    reads: list[str] = []
    originals = _watch(reads)
    result = train_step(job, micro, 0)
    for name, method in originals.items():  # unwatched again before the result is read here
        setattr(torch.Tensor, name, method)
    loss = float(accelerator.reduce(result.loss, reduction="sum"))
    # one file per process: two processes printing to one pipe can interleave their lines
    record = json.dumps({"rank": accelerator.process_index, "reads": reads, "loss": loss})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank-{accelerator.process_index}.json").write_text(record)


if __name__ == "__main__":
    debug_launcher(worker, args=(sys.argv[1],), num_processes=2)
