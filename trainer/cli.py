"""Command line: `train.py [--config X.yaml] [key=value ...]` and `train.py export|eval|predict|serve|select|pipeline|federated ...`.

User errors print one line on stderr and exit 2; nothing else is caught.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.errors import EXIT_USER_ERROR, UserError


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="peftforge: parameter-efficient fine-tuning. "
                                "Subcommands: `train.py export|eval|predict|serve|select|pipeline --help`; "
                                "`train.py federated --config X` (Flower simulation).")
    p.add_argument("--config", help="YAML recipe, e.g. configs/smollm2-lora.yaml (none: the demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=20")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py export", description="write a run's adapter, or the base model with it merged")
    p.add_argument("--run", required=True, help="run directory (train.output_dir)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _say(text: str, print_config: bool) -> None:
    """A note to the user, once under a launcher; beside --print-config on stderr (stdout: the YAML)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr if print_config else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            args = _export_parser().parse_args(argv[1:])
            from trainer.export import export
            out = export(args.run, args.out, merge=args.merge, overwrite=args.overwrite)
            print(f"exported to {out}")
            return 0
        if argv[:1] == ["eval"]:
            from trainer.inference.evaluation import main as evaluate_run
            return evaluate_run(argv[1:])
        if argv[:1] == ["predict"]:
            from trainer.inference.prediction import main as predict
            return predict(argv[1:])
        if argv[:1] in (["select"], ["pipeline"]):  # GOT-D data selection and select -> warm-up -> fine-tune
            from trainer.selection.cli import main as selection_main
            return selection_main(argv[0], argv[1:])
        if argv[:1] == ["serve"]:
            from trainer.serving.server import main as serve
            return serve(argv[1:])
        federated = argv[:1] == ["federated"]  # train.py federated: Flower simulation (trainer/federated)
        args = _train_parser().parse_intermixed_args(argv[1:] if federated else argv)
        from trainer import demo
        if args.config is None and not args.overrides and not federated:  # the demo, said before seconds of imports
            _say(demo.announcement(), args.print_config)
            args.config = str(demo.recipe())
        from trainer.config import load_config
        overrides = list(args.overrides) + (["train.overwrite=true"] if args.overwrite else [])
        cfg = load_config(args.config, overrides)
        if args.config is None:
            _say("\n".join(["no --config given: the schema's defaults with your overrides"] + demo.plan(cfg.to_dict())),
                 args.print_config)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if federated:
            from trainer.federated.simulation import run as train
        else:
            from trainer.loop import train
        run_dir = train(cfg)
        print(f"run saved in {run_dir}")
        return 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process hits it; say it once
            print(f"error: {e.line()}", file=sys.stderr)
        return EXIT_USER_ERROR
