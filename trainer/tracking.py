"""Where metrics go: metrics.jsonl (always), W&B through accelerate (optional), a tqdm bar.

Only the main process writes. On resume, metrics.jsonl is cut back to the resumed step so a
step is never logged twice, and W&B continues the run with the id saved in the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm


class Tracker:
    def __init__(self, accelerator, run_dir: Path, cfg, start_step: int, wandb_id: str | None):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.wandb_id = wandb_id
        if self.main:
            self._truncate_after(start_step)
        if cfg.tracking.wandb:
            os.environ.setdefault("WANDB_DIR", str(run_dir))
            init = {"name": cfg.tracking.run_name or run_dir.name, "tags": cfg.tracking.tags, "dir": str(run_dir)}
            if cfg.tracking.entity:
                init["entity"] = cfg.tracking.entity
            if wandb_id:
                init.update(id=wandb_id, resume="allow")
            accelerator.init_trackers(cfg.tracking.project, config=cfg.to_dict(), init_kwargs={"wandb": init})
            if self.main:
                self.wandb_id = accelerator.get_tracker("wandb", unwrap=True).id
        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not self.main, dynamic_ncols=True, desc="train")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', math.nan):.2e}")

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    def close(self) -> None:
        self.bar.close()
        self.accelerator.end_training()
