"""The run directory: refuse to clobber a finished or foreign run, find what to resume.

Checked before any model or data loads. A directory that holds a run (its config.yaml) is
refused unless `train.resume=auto` (continue it, with a compatible config) or
`train.overwrite=true` (start over; the old contents are removed only once the new run
actually starts).
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel

from trainer.checkpoint import latest_checkpoint
from trainer.errors import UserError

# What may change when a run resumes: how long it runs and when it stops, how often it logs,
# evaluates and saves, what it prints, and tracking. Every other key (model, data, adapter, optim,
# and the rest of train: batch, accumulation, seed, LR schedule, warm-up, clipping, gradient
# checkpointing) must match, or the resumed steps would not be the steps of the run that was stopped.
RESUME_MAY_CHANGE = {"tracking"} | {f"train.{k}" for k in (
    "output_dir", "max_steps", "stop_after_steps", "eval_every", "eval_batches", "log_every", "save_every", "keep_last",
    "resume", "overwrite", "sample_prompts", "max_new_tokens", "eval_at_start")}


def _defaults(section: BaseModel) -> dict:
    """Each field's default, in the shape of `to_dict()`, for the section classes `section` holds."""
    out = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        out[name] = _defaults(value) if isinstance(value, BaseModel) else field.get_default(call_default_factory=True)
    return out


def _first_difference(old: dict, new: dict, defaults: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if path in RESUME_MAY_CHANGE:
            continue
        a, b = old.get(key), new.get(key)
        # a key the saved run predates, at its default: that run ran as the default says
        if key not in old and key in defaults and b == defaults[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, defaults.get(key) or {}, f"{path}.")
            if found:
                return found
        elif a != b:
            return f"{path} was {a!r}, now {b!r}"
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
    diff = _first_difference(old, cfg.to_dict(), _defaults(cfg))
    if diff:
        raise UserError(f"cannot resume with a different config: {diff}", where=str(saved),
                        hint="only train.max_steps, stop_after_steps, eval/log/save cadence, sample prompts and "
                             "tracking may change on resume; use another output_dir for a different run")
    return latest_checkpoint(run_dir)
