"""What this CPU offers, as PyTorch is told to use it: the one home for smolvlm's CPU-feature checks.

The hardware's flags (``/proc/cpuinfo``), capped at PyTorch's own ISA level
(``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` lowers). So one
set of variables runs ATen, oneDNN, MKL *and* smolvlm's kernel choices as an AVX2-only CPU runs
them, on any x86-64 CPU with AVX2 (``avx2_only_env``; what the tests and ``bench/run.py --isa avx2``
use to cover that path on AVX-512 machines). Without a cap the flags are the hardware's.

Hardware probes such as ``torch.cpu._is_amx_tile_supported()`` ignore the cap; use ``has`` instead.
"""

from __future__ import annotations

import functools
import getpass
import os
import tempfile
from pathlib import Path

import torch

# Run as an AVX2-only CPU (no AVX-512, no AMX): PyTorch's vectorized kernels, oneDNN and MKL all capped.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def avx2_only_env() -> dict[str, str]:
    """The variables that run a new process as an AVX2-only CPU (``AVX2_ONLY``), with an Inductor cache of its
    own: Inductor's on-disk cache does not tell ATen's ISA levels apart (torch 2.13: a graph cached by an
    uncapped process decoded token 0 under the cap, one cached under the cap crashed an uncapped process
    with "free(): invalid pointer")."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                      f"torchinductor_{getpass.getuser()}")
    return {**AVX2_ONLY, "TORCHINDUCTOR_CACHE_DIR": cache.rstrip("/") + "-avx2"}


# flags a capability level takes away (prefixes of /proc/cpuinfo names)
_ABOVE = {"AVX2": ("avx512", "amx"), "DEFAULT": ("avx2", "fma", "f16c", "avx512", "amx")}


def hardware_flags() -> frozenset[str] | None:
    """The CPU's flags from ``/proc/cpuinfo`` (None where it cannot be read: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


@functools.lru_cache(maxsize=None)
def vendor() -> str | None:
    """The CPU's vendor from ``/proc/cpuinfo`` ("GenuineIntel", "AuthenticAMD", ...; None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), None)


def mkl_runs_avx512() -> bool:
    """Whether MKL, which PyTorch's float32 ``F.linear`` calls, runs AVX-512 code here: only on Intel CPUs
    (MKL picks its code by vendor) with AVX-512 that PyTorch may use. Elsewhere it runs AVX2 code, and
    oneDNN's float32 GEMM is the faster one: on an AMD EPYC Zen 5, 2 threads, 1024 x 768 by 768 x 3072
    215 GFLOP/s through MKL (two 8-lane FMAs a cycle: AVX2's peak) against 494 through oneDNN
    (``bench/ANALYSIS.md``, twenty-second round)."""
    return vendor() == "GenuineIntel" and has("avx512f")


def capability() -> str:
    """PyTorch's CPU ISA level: "AVX512", "AVX2", "DEFAULT" (or another architecture's name)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=None)
def flags() -> frozenset[str] | None:
    """The hardware's flags less those above PyTorch's ISA level (None where they cannot be read)."""
    found = hardware_flags()
    if found is None:
        return None
    dropped = _ABOVE.get(capability(), ())
    return frozenset(f for f in found if not f.startswith(dropped)) if dropped else found


def has(flag: str) -> bool:
    """Whether the CPU has ``flag`` (a ``/proc/cpuinfo`` name) and PyTorch is allowed to use it."""
    found = flags()
    return found is not None and flag in found


def simd_flags() -> str:
    """The SIMD flags PyTorch may use here (``avx*``, ``amx*``, ``fma``), sorted: what a benchmark prints
    beside its numbers, since the paths differ between AVX2-only, AVX-512 and AMX CPUs."""
    return " ".join(sorted(f for f in (flags() or ()) if f.startswith(("avx", "amx", "fma")))) or "unknown"


def capped() -> bool:
    """Whether PyTorch runs below the hardware's ISA (``ATEN_CPU_CAPABILITY`` set lower)."""
    return flags() != hardware_flags()
