"""The run directory: refuse to clobber a finished or foreign run, find what to resume.

Checked before any model or data loads. A directory that holds a run (its config.yaml) is
refused unless `train.resume=auto` (continue it, with a compatible config) or
`train.overwrite=true` (start over; the old contents are removed only once the new run
actually starts).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from trainer.checkpoint import latest_checkpoint
from trainer.errors import UserError

# Sections that must match to resume; train.max_steps, eval/save cadence and tracking may change.
RESUME_MUST_MATCH = ("model", "data", "adapter", "optim")
RESUME_TRAIN_KEYS = ("batch_size", "gradient_accumulation_steps", "seed")


def _first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return None


def plan_run_dir(cfg) -> Path | None:
    """Validate the run dir for this config; returns the checkpoint to resume from, if any."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError("is a file, not a directory", where=f"train.output_dir={run_dir}")
    saved = run_dir / "config.yaml"
    if not saved.exists():
        if cfg.train.resume == "auto" and run_dir.exists() and any(run_dir.iterdir()):
            raise UserError("holds files but no run to resume", where=f"train.output_dir={run_dir}",
                            hint="pick an empty or new directory")
        return None
    if cfg.train.overwrite:
        return None
    if cfg.train.resume != "auto":
        raise UserError("already holds a run", where=f"train.output_dir={run_dir}",
                        hint="use train.resume=auto to continue it, train.overwrite=true to replace it, or another output_dir")
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.to_dict()
    for section in RESUME_MUST_MATCH:
        diff = _first_difference(old.get(section, {}), new[section], f"{section}.")
        if diff:
            raise UserError(f"cannot resume with a different config: {diff}", where=str(saved))
    for key in RESUME_TRAIN_KEYS:
        if old.get("train", {}).get(key) != new["train"][key]:
            raise UserError(f"cannot resume with a different config: train.{key} was "
                            f"{old.get('train', {}).get(key)!r}, now {new['train'][key]!r}", where=str(saved))
    return latest_checkpoint(run_dir)
