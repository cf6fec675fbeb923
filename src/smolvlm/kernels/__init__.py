"""Native CPU kernels, built once on first use by PyTorch's C++ extension loader.

``int8_gemv.cpp``: the int8 weight x float activation GEMV of quantized decode (x86-64 with AVX2 and
FMA), registered as ``torch.ops.smolvlm.int8_gemv`` with a shape-only ("fake") version, so
``torch.compile`` keeps it inside the compiled decode step. Why it exists: its header.

Nothing needs it: without a C++ compiler, without AVX2/FMA, off Linux x86-64 or with
``SMOLVLM_CPU_KERNELS=0``, the layers use PyTorch's own kernels and :func:`problem` says why. The
build takes about a minute on 2 cores and is cached by PyTorch (``~/.cache/torch_extensions``, or
``$TORCH_EXTENSIONS_DIR``); it is rebuilt only when the source changes.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

ENV = "SMOLVLM_CPU_KERNELS"  # "0": never build or use them
_NAME = "smolvlm_int8_gemv"
_SOURCE = Path(__file__).with_name("int8_gemv.cpp")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for splits rows over torch's threads

_state: dict[str, object] = {}  # "problem": str | None once a build was tried


def _cpu_problem() -> str | None:
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"no kernel for {sys.platform} {platform.machine()} (Linux x86-64 only)"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo ({e.strerror})"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return f"this CPU lacks {' and '.join(missing)}" if missing else None


def _build() -> str | None:
    problem = _cpu_problem()
    if problem:
        return problem
    from torch.utils import cpp_extension

    try:  # pip's ninja package puts its binary next to the interpreter, which may not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    try:
        build_dir = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
        if not (build_dir / f"{_NAME}.so").exists():
            print("smolvlm: building the int8 CPU kernel (once, about a minute; cached in "
                  f"{build_dir.parent})", file=sys.stderr, flush=True)
        cpp_extension.load(_NAME, [str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, unwritable cache, compile error: the fallback runs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the int8 kernel did not build: {first[:200]}"

    @torch.library.register_fake("smolvlm::int8_gemv")
    def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    return None


def prepare() -> bool:
    """Build/load the kernels now (not inside a forward), once per process; True when usable."""
    if "problem" not in _state:
        _state["problem"] = _build()
    return _state["problem"] is None


def int8_gemv_ready() -> bool:
    """Whether ``torch.ops.smolvlm.int8_gemv`` can run; builds it on the first eager call."""
    if "problem" not in _state:
        if torch.compiler.is_compiling():
            return False
        prepare()
    return _state["problem"] is None


def problem() -> str | None:
    """Why the kernels are not used (None: they are), after :func:`prepare`."""
    prepare()
    return _state["problem"]  # type: ignore[return-value]
