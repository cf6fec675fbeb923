"""`smolvlm train`: run (or resume) a training recipe. Parsing only; the work is
``smolvlm.training.build.run_recipe``."""

from __future__ import annotations

import argparse


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/default-model.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value with a dotted key and a YAML value, e.g. train.max_steps=10 "
                        "(repeatable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--dry-run", action="store_true", help="parse and print the recipe, then exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from smolvlm.training.build import run_recipe
    from smolvlm.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    result = run_recipe(recipe, resume=args.resume)
    ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"trained to step {result.step}: loss {result.last_loss:.4f}{ev}; outputs in {result.output_dir}")
    return 0
