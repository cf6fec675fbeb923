"""Native CPU kernels, built once on first use by PyTorch's C++ extension loader.

- ``int8_gemv.cpp``: the int8 weight GEMV of quantized decode (float32 activations as they are,
  bf16/fp16 ones quantized to int8 per 32 as llama.cpp does), ``torch.ops.smolvlm.int8_gemv``.
- ``int4_gemv.cpp``: the group-wise int4 weight GEMV of quantized decode for bf16/fp16 activations
  (quantized to int8 per 32, llama.cpp's Q4_1 x Q8_1 dot), ``torch.ops.smolvlm.int4_gemv``.
- ``float_gemv.cpp``: the GEMV of plain bf16 and float32 weights (bf16 decode where oneDNN has no bf16
  kernels, AVX2-only CPUs: ``model/upcast.py``'s ``UpcastLinear``; bf16 and float32 text linears left
  unpacked on AVX-512 CPUs, AMX ones included: ``GemvLinear``), ``torch.ops.smolvlm.bf16_gemv`` / ``f32_gemv``.
- ``decode_attention.cpp``: one query per row over an fp32 or bf16 KV cache (the decode step's attention),
  ``torch.ops.smolvlm.decode_attention``; a bf16 query over a bf16 cache goes to
  ``bf16_decode_attention.cpp`` where the CPU has AVX-512 BF16 (key chunks split over the threads).
- ``bf16_attention.cpp``: bf16 attention of a whole sequence, with a key mask, a mask per query or
  causal (the vision encoder's, a prompt's), AVX-512 BF16 only, ``torch.ops.smolvlm.bf16_attention``.
- ``f32_attention.cpp``: the same in float32, AVX-512 only, where MKL (inside PyTorch's flash attention)
  runs AVX2 code (non-Intel CPUs: ``cpu.mkl_runs_avx512``), ``torch.ops.smolvlm.f32_attention``.
- ``rms_norm.cpp``: Llama's RMSNorm in one call (eager steps; ``layers.RMSNorm``),
  ``torch.ops.smolvlm.rms_norm``.
- ``decode_layers.cpp``: an eager decode step (one sequence, or continuous batching's rows at their own
  slots) through every decoder layer in one call, composed of the kernels above
  (``model/fused_decode.py``), ``torch.ops.smolvlm.decode_layers``.

All are x86-64 AVX2 + FMA (``common.h``: what the GEMVs share; ``attention.h``: what the attentions
share; ``seq_attention.h``: the two whole-sequence attentions' driver; ``ops.h``: the entry points ``decode_layers`` composes; ``bf16_attention`` and ``f32_attention``
compile their functions for AVX-512 (BF16) and run only where the CPU has it), registered with a shape-only ("fake")
version, so ``torch.compile`` keeps them inside a compiled graph. Why each exists: its header.

Which run where is decided on ``smolvlm.cpu``'s flags: the CPU's, less those above PyTorch's ISA level, so a
process run with ``ATEN_CPU_CAPABILITY=avx2`` chooses as an AVX2-only CPU does (``cpu.avx2_only_env``).

Nothing needs them: without a C++ compiler, without AVX2/FMA, off Linux x86-64 or with
``SMOLVLM_CPU_KERNELS=0``, the layers use PyTorch's own kernels and :func:`problem` says why. On
CPUs with AMX only decode runs them (the fused step, its attention and RMSNorm, the bf16/float32 GEMV, int8's
GEMV for one or two rows; images and prompts stay on oneDNN's and PyTorch's AMX kernels), on AVX-512 CPUs only the attentions, the bf16/float32 GEMV, the RMSNorm, the
int8 GEMV for one or two bf16 rows (any float32 decode call) and the fused decode step, unless
``SMOLVLM_CPU_KERNELS=1`` (see :func:`prepare`). The build takes about a minute on 2 cores and is cached by
PyTorch (``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``); it is rebuilt only when a source changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

from smolvlm import cpu

ENV = "SMOLVLM_CPU_KERNELS"  # "0": never build or use them
_NAME = "smolvlm_cpu_kernels"
_SOURCES = [Path(__file__).with_name(f) for f in ("int8_gemv.cpp", "int4_gemv.cpp", "float_gemv.cpp",
                                                       "decode_attention.cpp", "bf16_decode_attention.cpp",
                                                       "bf16_attention.cpp", "f32_attention.cpp", "rms_norm.cpp",
                                                       "decode_layers.cpp")]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for splits rows over torch's threads

_state: dict[str, object] = {}  # "built": build problem or None; "use": why the layers do not use them, or None


def _cpu_problem() -> str | None:
    """Why the kernel cannot be built or run here (None: it can)."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"no kernel for {sys.platform} {platform.machine()} (Linux x86-64 only)"
    flags = cpu.flags()  # capped at PyTorch's ISA level (smolvlm/cpu.py)
    if flags is None:
        return "cannot read /proc/cpuinfo"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    if missing and cpu.capped():
        return f"PyTorch runs at its {cpu.capability()} level (ATEN_CPU_CAPABILITY), without {' and '.join(missing)}"
    return f"this CPU lacks {' and '.join(missing)}" if missing else None


def _headers_version() -> str:
    """A define naming the headers' contents: PyTorch's loader rebuilds when a source or a flag changes,
    and it hashes only the sources it is given, so a changed header changes a flag."""
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h"))))
    return f"-DSMOLVLM_HEADERS={digest.hexdigest()[:16]}"


def _compile() -> str | None:
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
            print("smolvlm: building the CPU kernels (once, about a minute; cached in "
                  f"{build_dir.parent})", file=sys.stderr, flush=True)
        cpp_extension.load(_NAME, [str(f) for f in _SOURCES], extra_cflags=_FLAGS + [_headers_version()],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, unwritable cache, compile error: the fallback runs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the CPU kernels did not build: {first[:200]}"

    def gemv(x: torch.Tensor, w: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    def gemv_cat(x: torch.Tensor, w: list[torch.Tensor], *scales: list[torch.Tensor]) -> torch.Tensor:
        return x.new_empty(x.shape[0], sum(t.shape[0] for t in w))

    # every GEMV: (M, N) out, whatever rides along (int8's scales, int4's tables, nothing for bf16)
    for kind in ("int8", "int4", "bf16", "f32"):
        torch.library.register_fake(f"smolvlm::{kind}_gemv")(gemv)
        torch.library.register_fake(f"smolvlm::{kind}_gemv_cat")(gemv_cat)

    @torch.library.register_fake("smolvlm::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return q.new_empty(q.shape)

    def seq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool) -> torch.Tensor:
        b, h, t, d = q.shape
        return q.new_empty(b, t, h * d)

    for kind in ("bf16", "f32"):
        torch.library.register_fake(f"smolvlm::{kind}_attention")(seq_attention)

    @torch.library.register_fake("smolvlm::decode_layers")
    def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *rest) -> torch.Tensor:
        return x.new_empty(x.shape)

    # the bf16 GEMV's AVX-512 BF16 dot: where PyTorch may use AVX-512 too (smolvlm/cpu.py), so an AVX2-only
    # run (ATEN_CPU_CAPABILITY=avx2) takes the AVX2 loop, as an AVX2-only CPU does
    torch.ops.smolvlm.use_bf16_dot(cpu.has("avx512_bf16"))

    @torch.library.register_fake("smolvlm::rms_norm")
    def _(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    return None


def build() -> str | None:
    """Build/load the ``torch.ops.smolvlm`` kernels once per process; None when they are there, else why
    not (said once on stderr when a build was tried and failed: int8 decode is then about 1.7x slower)."""
    if "built" not in _state:
        _state["built"] = problem = _compile()
        if problem and _cpu_problem() is None:
            print(f"smolvlm: {problem}; decoding uses PyTorch's slower kernels", file=sys.stderr, flush=True)
    return _state["built"]  # type: ignore[return-value]


def prepare() -> bool:
    """Decide, once per process and not inside a forward, whether the layers run the kernels,
    building them if so. Where they were measured against PyTorch's and win:
    - AVX2-only CPUs (AMD EPYCs, bench/ANALYSIS.md, ninth to thirteenth rounds): all of them;
    - AVX-512 without AMX (an AMD EPYC, Zen 5; fourteenth round): the decode attention (256M
      bf16 compiled step 11.4 -> 9.2 ms, its fp32 cache read 2x faster than by PyTorch's flash
      attention) and, with AVX-512 BF16, the bf16 attention of images and prompts (one 512 px tile's
      12 heads 17.2-18.2 -> 4.7-4.9 ms; fifteenth round), and the bf16 GEMV of a bf16 model's decode
      on its plain text weights (``upcast.GemvLinear``: a 256M step's linears 5.8 against 7.4 ms through
      oneDNN's packed weights; sixteenth round), and the int8 GEMV for one or two rows (a single
      stream's decode step: ``Int8Linear`` kind "int8_rows"; SmolLM2-135M int8 compiled decode
      129-133 -> 150-208 tok/s, median 189; seventeenth round). PyTorch's AVX-512 GEMVs stay for more rows (int8
      bf16/fp16 from 3 rows; int4 for all: its kernel is 1.6-2.5x faster than ours from 2 rows and needs
      its own weight layout); and the RMSNorm of eager steps (about 3 against 11 us a call); the
      float32 GEMV of a float32 model's plain text linears (80 layers of 576x1536 and 1536x576: 4.4
      against 14.9 ms through MKL, 8.9 through oneDNN's packed weights); the fused decode step (256M bf16 10.5 -> 7.3 ms a step; eighteenth round);
    - AMX: decode only (``ON_AMX``): the fused decode step, its decode attention and RMSNorm (and the same
      two in the layer-by-layer forward, whose numbers the step must match), the bf16/float32 GEMV of the
      plain text linears (``GemvLinear``) and the int8 GEMV for one or two rows (any float32 call; PyTorch's
      int8 GEMV has no AMX code). Images and prompts stay on PyTorch's flash attention and oneDNN's AMX
      GEMMs (the vision tower packed), int4 and wider int8 calls on PyTorch's kernels. Measured on a Xeon
      with AMX (2 cores; twenty-fourth round, ``bench/run.py --kernel-policies`` in ``bench/RESULTS.md``,
      ``bench/gemv_rows.py``): 256M bf16 decode at a 900-token context 34.5 tok/s with no kernels, 55.2 with
      the step over oneDNN's packed GEMVs (a run before), 64.1 with the GEMV too (one row: 9.7 against 15.0
      ms for 30 layers' linears); a 512 px tile 0.224 s, against 0.399 with smolvlm's bf16 attention; prefill
      0.82x on the unpacked text weights; SmolLM2-135M int8 decode 47 -> 118 tok/s.
    ``SMOLVLM_CPU_KERNELS=1`` runs all of them on any x86-64 CPU with AVX2 (the bf16 attention only
    where the CPU has AVX-512 BF16)."""
    if "use" not in _state:
        flags = cpu.flags() or frozenset()
        forced = os.environ.get(ENV) == "1"
        _state["use"] = build()
        if "amx_tile" in flags and not forced and _state["use"] is None:
            _state["use"] = AMX  # the kinds of ``ON_AMX`` only
        _state["gemv"] = ("this CPU has AVX-512: PyTorch's GEMVs are used" if "avx512f" in flags and not forced
                          else _state["use"])
        _state["bf16_attention"] = ("this CPU lacks AVX-512 BF16" if "avx512_bf16" not in flags
                                    else _state["use"])
        _state["f32_attention"] = ("this CPU lacks AVX-512" if "avx512f" not in flags
                                   else "MKL runs AVX-512 here: PyTorch's attention is used" if cpu.mkl_runs_avx512()
                                   else _state["use"])
    return _state["use"] is None


KINDS = ("gemv", "decode_attention", "bf16_attention", "f32_attention", "float_gemv", "int8_rows", "rms_norm",
         "decode_layers")
AMX = ("this CPU has AMX: smolvlm's kernels run in decode only, PyTorch's and oneDNN's AMX kernels for images and "
       "prompts")
ON_AMX = ("decode_layers", "decode_attention", "rms_norm", "int8_rows", "float_gemv")  # the kinds run on AMX CPUs (``prepare``)


def ready(kind: str = "gemv") -> bool:
    """Whether the layers run these kernels of one kind: ``"gemv"`` (``Int8Linear``, ``Int4Linear``,
    ``UpcastLinear``), ``"decode_attention"``, ``"bf16_attention"`` or ``"f32_attention"`` (``layers.attention``),
    ``"float_gemv"`` (``upcast.GemvLinear``: a bf16 or float32 model's unpacked text linears), ``"int8_rows"``
    (``Int8Linear``'s GEMV for ``int8.OWN_ROWS`` bf16/fp16 rows or fewer, and for float32, where
    ``"gemv"`` is not ready), ``"rms_norm"`` (``layers.RMSNorm`` outside autograd and compiled
    graphs) or ``"decode_layers"`` (``model.fused_decode``: an eager decode step of one or more rows in one
    call); decides
    (and builds) on the first eager call if :func:`prepare` has not run (never inside a
    ``torch.compile`` trace)."""
    if kind not in KINDS:
        raise ValueError(f"no kernels of kind {kind!r}; one of {KINDS}")
    if "use" not in _state:
        if torch.compiler.is_compiling():
            return False
        prepare()
    if _state["use"] is not None and not (_state["use"] == AMX and kind in ON_AMX):
        return False
    if kind == "gemv":
        return _state.get("gemv") is None
    if kind in ("bf16_attention", "f32_attention"):
        return _state.get(kind, "not decided") is None
    return True  # the decode attention, the bf16 GEMV, int8's few rows, the RMSNorm, the fused step: wherever any run


def problem() -> str | None:
    """Why the layers use none of the kernels here, or on AMX CPUs only ``ON_AMX``'s (``AMX``; None: they use
    them, the GEMVs only where ``ready()`` says so)."""
    prepare()
    return _state["use"]  # type: ignore[return-value]
