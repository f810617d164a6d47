"""`python train.py` with no --config: what it runs, said before it runs.

With nothing else on the command line it runs the demo recipe (configs/smollm2-lora.yaml, which
scripts/demo.sh runs too), announced from the recipe's YAML before torch and peft are even
imported (that alone takes seconds): what it trains, how many steps, where, and about how long and
how much memory, as measured. With overrides but no --config the overrides apply to the schema's
defaults, and the same plan (without an estimate) is printed once the config is validated.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from trainer.errors import UserError

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "smollm2-lora.yaml"

# The demo as measured under the shared lock on the 2-core, no-GPU machine this project is built
# on (README "Quick start" and the issue-14 note give the command and load): the whole
# `train.py` run, from start to the saved adapter and the answers after training.
MEASURED_MINUTES = 3  # 2 min 40 s
MEASURED_PEAK_GB = 2.5


def recipe() -> Path:
    if not RECIPE.is_file():  # an installed wheel carries no configs/
        raise UserError("no --config given, and the demo recipe is not installed here", where=str(RECIPE),
                        hint="pass --config YOUR_RECIPE.yaml")
    return RECIPE


def announcement() -> str:
    """The demo's plan and its measured cost, from the recipe file alone."""
    lines = [f"no --config given: running the demo, {RECIPE.parent.name}/{RECIPE.name}"]
    lines += plan(yaml.safe_load(recipe().read_text()))
    lines.append(f"  expect:  about {MEASURED_MINUTES} min and {MEASURED_PEAK_GB:g} GB of memory on a 2-core CPU "
                 "(measured; faster on a GPU or more cores)")
    lines.append("  your own run: python train.py --config configs/<recipe>.yaml [key=value ...]")
    return "\n".join(lines)


def plan(cfg: dict) -> list[str]:
    """What a config (as a dict: a recipe's YAML or Config.to_dict()) will train, and where."""
    model, data, adapter, train = (cfg.get(k) or {} for k in ("model", "data", "adapter", "train"))
    rank = f" r={adapter['r']}" if adapter.get("r") is not None else ""
    evals = f"held-out loss every {train['eval_every']} steps" if train.get("eval_every") else "held-out loss at the end"
    return [
        f"  trains:  {adapter.get('type', 'lora')}{rank} on {model.get('name_or_path')} ({model.get('task', 'causal_lm')}), "
        f"data {data.get('path')}, max_length {data.get('max_length')}",
        f"  steps:   {train.get('max_steps')} of batch {train.get('batch_size')}; {evals}",
        f"  output:  {train.get('output_dir')}/",
    ]
