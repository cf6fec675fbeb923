"""`smolvlm train`: run (or resume) a training recipe. Parsing only; the work is
``smolvlm.training.build.run_recipe``."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/default-model.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value with a dotted key and a YAML value, e.g. train.max_steps=10 "
                        "(repeatable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, the data summary, the trainable parameter count and a memory "
                        "estimate (builds the model), then exit without training or writing anything")


def run(args: argparse.Namespace) -> int:
    import yaml

    from smolvlm.torchrun import from_env
    from smolvlm.training.build import run_recipe
    from smolvlm.training.dry_run import dry_run
    from smolvlm.training.loop import Interrupted
    from smolvlm.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        print(dry_run(recipe), end="")
        return 0
    main = from_env().is_main  # under torchrun only rank 0 reports
    try:
        result = run_recipe(recipe, resume=args.resume)
    except Interrupted as e:
        if main and e.checkpoint is not None:
            again = ["smolvlm", "train", "--recipe", args.recipe, *(x for o in args.overrides for x in ("--set", o)),
                     "--resume"]
            under = " (with the same torchrun options in front)" if from_env().world > 1 else ""
            print(f"smolvlm train: {e}: {shlex.join(again)}{under}", file=sys.stderr)
        elif main:
            print(f"smolvlm train: {e}", file=sys.stderr)
        return 130
    if main:
        ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        print(f"trained to step {result.step}: loss {result.last_loss:.4f}{ev}; outputs in {result.output_dir}")
    return 0
