"""smolvlm.cpu: the CPU's flags as PyTorch is allowed to use them (the one home of feature checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from smolvlm import cpu

HW = {"fma", "f16c", "avx", "avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "sse4_2"}


@pytest.fixture
def hardware(monkeypatch):
    monkeypatch.setattr(cpu, "hardware_flags", lambda: frozenset(HW))
    cpu.flags.cache_clear()
    yield
    cpu.flags.cache_clear()


@pytest.mark.parametrize("level, dropped", [
    ("AVX512", set()),
    ("AVX2", {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
    ("DEFAULT", {"fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
])
def test_flags_above_pytorchs_level_are_dropped(hardware, monkeypatch, level, dropped):
    monkeypatch.setattr(cpu, "capability", lambda: level)
    assert cpu.flags() == HW - dropped
    assert cpu.capped() == bool(dropped)
    assert cpu.has("sse4_2") and cpu.has("avx") and not cpu.has("no_such_flag")
    assert cpu.has("amx_tile") == (level == "AVX512")


@pytest.mark.parametrize("vendor, level, avx512", [
    ("GenuineIntel", "AVX512", True), ("GenuineIntel", "AVX2", False),  # the cap (MKL_ENABLE_INSTRUCTIONS too)
    ("AuthenticAMD", "AVX512", False), (None, "AVX512", False)])
def test_mkl_runs_avx512_only_on_intel_cpus_that_may_use_it(hardware, monkeypatch, vendor, level, avx512):
    """MKL (float32 ``F.linear``) picks its code by vendor: AVX-512 on Intel CPUs only, so packing float32 (oneDNN's
    GEMM) pays everywhere else (``packed.packing_pays``)."""
    from smolvlm.model import packed

    monkeypatch.setattr(cpu, "capability", lambda: level)
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    assert cpu.mkl_runs_avx512() == avx512
    assert packed.packing_pays(torch.float32) == (packed.packing_available(torch.float32) and not avx512)


def test_vendor_reads_proc_cpuinfo():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert cpu.vendor() is None
        return
    want = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), None)
    assert cpu.vendor() == want


def test_doctor_names_the_level_the_deciding_flags_and_a_cap(hardware, monkeypatch):
    from smolvlm.cli import doctor

    monkeypatch.setattr(cpu, "capability", lambda: "AVX512")
    assert doctor._cpu_status() == "AVX512 (avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile)"
    cpu.flags.cache_clear()
    monkeypatch.setattr(cpu, "capability", lambda: "AVX2")
    assert doctor._cpu_status() == "AVX2 (avx2 fma; capped below the hardware's by ATEN_CPU_CAPABILITY)"


@pytest.mark.parametrize("vendor, level, says", [
    ("AuthenticAMD", "AVX512", "oneDNN (MKL would run its AVX2 code here: AuthenticAMD, not Intel)"),
    ("GenuineIntel", "AVX2", "oneDNN (MKL would run its AVX2 code here: no AVX-512 in use)"),
    ("GenuineIntel", "AVX512", "MKL through F.linear (AVX-512 on this Intel CPU)")])
def test_doctor_names_the_library_of_float32_gemms(hardware, monkeypatch, vendor, level, says):
    from smolvlm.cli import doctor
    from smolvlm.model import packed

    monkeypatch.setattr(cpu, "capability", lambda: level)
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    monkeypatch.setattr(packed, "packing_available", lambda dtype, device="cpu": True)
    assert doctor._float32_gemm_status() == says
    monkeypatch.setattr(packed, "packing_available", lambda dtype, device="cpu": False)
    assert doctor._float32_gemm_status() == "MKL through F.linear (oneDNN cannot run them here)"


@pytest.mark.parametrize("flags, built, says", [
    ({"avx2", "fma", "avx512f", "amx_tile"}, None, "built, in decode only (this CPU has AMX"),
    ({"avx2", "fma", "avx512f", "amx_tile"}, "c++: not found", "not used: c++: not found"),
    ({"avx2", "fma"}, None, "built, in use"),
    ({"avx2", "fma"}, "c++: not found", "not used: c++: not found")])
def test_doctor_says_where_the_kernels_run(monkeypatch, flags, built, says):
    from smolvlm import kernels
    from smolvlm.cli import doctor

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(flags))
    monkeypatch.setattr(kernels, "build", lambda: built)
    assert doctor._kernels_status().startswith(says)


def test_the_kernels_name_a_cap_below_avx2_as_the_reason(hardware, monkeypatch):
    from smolvlm import kernels

    monkeypatch.setattr(cpu, "capability", lambda: "DEFAULT")
    assert kernels._cpu_problem() == "PyTorch runs at its DEFAULT level (ATEN_CPU_CAPABILITY), without avx2 and fma"


def test_unreadable_cpuinfo_means_no_flags(monkeypatch):
    monkeypatch.setattr(cpu, "hardware_flags", lambda: None)
    cpu.flags.cache_clear()
    try:
        assert cpu.flags() is None and not cpu.has("avx2")
    finally:
        cpu.flags.cache_clear()


PROBE = """
import json, torch
from smolvlm import cpu, kernels
from smolvlm.model.layers import cpu_attends_fast_in
from smolvlm.model.packed import packing_available, packing_pays
from smolvlm.model.upcast import text_gemv_pays
from smolvlm.training.loop import native_bf16
kernels.prepare()
print(json.dumps(dict(level=cpu.capability(), capped=cpu.capped(), avx512=cpu.has("avx512f"),
    kernels={k: kernels.ready(k) for k in kernels.KINDS}, problem=kernels.problem(),
    pack_bf16=packing_available(torch.bfloat16), pack_f32=packing_pays(torch.float32),
    gemv_f32=text_gemv_pays(torch.float32), gemv_bf16=text_gemv_pays(torch.bfloat16),
    bf16_cache=cpu_attends_fast_in(torch.bfloat16), autocast=native_bf16("cpu"))))
"""


def test_avx2_only_runs_every_choice_as_an_avx2_only_cpu():
    """Under ``cpu.avx2_only_env()`` a process on any AVX2 CPU takes the AVX2-only CPU's paths, as measured on one
    (bench/ANALYSIS.md): all smolvlm kernels but the AVX-512 attentions, no oneDNN bf16 packing, packed float32,
    a bf16 KV cache for bf16 models where the decode attention kernel runs (else fp32), no bf16 autocast."""
    hw = cpu.hardware_flags() or frozenset()
    if not {"avx2", "fma"} <= hw:
        pytest.skip("this CPU has no AVX2 + FMA to run as an AVX2-only one")
    env = {**os.environ, **cpu.avx2_only_env()}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["level"] == "AVX2" and not got["avx512"]
    assert got["capped"] == any(f.startswith(("avx512", "amx")) for f in hw)
    assert not got["pack_bf16"] and not got["autocast"]
    assert got["bf16_cache"] == got["kernels"]["decode_attention"]
    assert got["pack_f32"]  # float32 is packed where there is no AVX-512 (the vision tower; batched text)
    # single-stream text linears: float32 through smolvlm's GEMV where it runs, bf16 upcast (no GemvLinear)
    assert got["gemv_f32"] == got["kernels"]["float_gemv"] and not got["gemv_bf16"]
    if got["problem"] is None:  # the kernels built (a compiler is there): all but the AVX-512 attentions
        assert got["kernels"] == {k: k not in ("bf16_attention", "f32_attention") for k in got["kernels"]}


# What runs differently on an AVX2-only CPU: the kernels' dispatch, packing, upcasting, the KV cache dtype, quantized
# and compiled decode, the engine; and everything the reference is compared with (tests/parity).
AVX2_PATH_TESTS = ["tests/parity", *(f"tests/unit/test_{name}.py" for name in (
    "cpu_kernels", "fused_decode", "speed_paths", "packed", "upcast", "quantization", "compiled_decode", "engine",
    "model_unit", "stream", "qlora"))]


def test_the_avx2_only_path_passes_the_numerics_tests():
    """Every CPU this suite runs on also checks the AVX2-only CPU's paths: the tests above, in a process run as
    one (``cpu.avx2_only_env``). Their own skips there (bf16 packing, the AVX-512 attention kernels: what such a CPU
    lacks) are listed in the failure output only; natively they run here."""
    hw = cpu.hardware_flags() or frozenset()
    if not {"avx2", "fma"} <= hw:
        pytest.skip("this CPU has no AVX2 + FMA to run as an AVX2-only one")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tests = [t for t in AVX2_PATH_TESTS if os.path.exists(os.path.join(root, t))]
    assert len(tests) == len(AVX2_PATH_TESTS), "a test file named in AVX2_PATH_TESTS is gone: update the list"
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "-x", *tests],
                         env={**os.environ, **cpu.avx2_only_env()}, cwd=root, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, f"as an AVX2-only CPU:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}"


def test_simd_flags_names_the_vector_flags_pytorch_may_use(monkeypatch):
    """What benchmarks print beside their numbers: the avx/amx/fma flags, sorted; "unknown" without flags."""
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"sse4_2", "fma", "avx512f", "amx_tile", "avx2", "f16c"}))
    assert cpu.simd_flags() == "amx_tile avx2 avx512f fma"
    monkeypatch.setattr(cpu, "flags", lambda: None)
    assert cpu.simd_flags() == "unknown"
