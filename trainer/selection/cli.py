"""`train.py select ...` and `train.py pipeline ...`: argument parsing; trainer.cli dispatches here."""
from __future__ import annotations

import argparse


def _parser(command: str) -> argparse.ArgumentParser:
    about = {"select": "select warm-up data from a candidate pool for a target (GOT-D, nearest, DSIR, random)",
             "pipeline": "select -> warm up on the selection -> fine-tune from the warmed-up weights"}
    p = argparse.ArgumentParser(prog=f"train.py {command}", description=about[command])
    p.add_argument("--config", help="YAML recipe with a selection: section, e.g. configs/select-tiny.yaml")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing selection" + (" and redo every stage" if command == "pipeline" else ""))
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. selection.budget=500 selection.method=dsir")
    return p


def main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_intermixed_args(argv)
    from trainer.config import load_config

    overrides = list(args.overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(load_config(args.config, overrides).to_dict(), sort_keys=False), end="")
        return 0
    if command == "select":
        from trainer.selection.select import select
        cfg = load_config(args.config, overrides + (["selection.overwrite=true"] if args.overwrite else []))
        out = select(cfg)
        print(f"selection saved in {out} ({out / 'selected.jsonl'}; train on it with data.path={out / 'selected.jsonl'})")
        return 0
    from trainer.selection.pipeline import Stopped, run_pipeline
    try:
        root = run_pipeline(args.config, overrides, overwrite=args.overwrite)
    except Stopped as e:
        print(f"[pipeline] {e}")
        return 0
    print(f"pipeline finished in {root} (fine-tuned run: {root / 'finetune'})")
    return 0
