"""`smolvlm export-default DIR`: write the built-in default model as a standard SmolVLM checkpoint
folder (float32 safetensors + config + processor files) that transformers loads."""

from __future__ import annotations

import argparse


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="output folder (created; existing weights in it are replaced)")


def run(args: argparse.Namespace) -> int:
    from smolvlm.weights.default_model import export_default

    out = export_default(args.directory)
    print(f"wrote the default model to {out}")
    return 0
