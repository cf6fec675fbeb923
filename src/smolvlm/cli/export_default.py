"""`smolvlm export-default DIR`: write the built-in default model as a standard SmolVLM checkpoint
folder (float32 safetensors + config + processor files) that transformers loads."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="output folder (created; existing weights in it are replaced)")


def check_output_dir(directory: str) -> Path:
    """Fail before the model loads if ``directory`` cannot become a checkpoint folder: it is a file, or
    its nearest existing folder cannot be written."""
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise common.UserError(f"{directory} is a file; give a new or existing folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise common.UserError(f"cannot create {directory}: {existing} is a file, not a folder")
    try:  # a real write: permissions, read-only file systems and ACLs all show here
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise common.UserError(f"cannot write to {existing}: {e.strerror or e}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from smolvlm.weights.save import export_default

    out = check_output_dir(args.directory)
    with common.status_line("exporting the built-in default model..."):
        out = export_default(out)
    print(f"wrote the default model to {out}")
    return 0
