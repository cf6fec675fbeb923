"""smolvlm's native CPU kernels (``smolvlm/kernels``): the AVX2 int8 and int4 decode GEMVs and decode attention.

Tolerances. float32 activations: the kernel multiplies exact int8 weights by float32 activations
and sums in float32, only in another order than the float64 reference: over K <= 576 terms of O(1)
products the float32 error is ~K * 2^-24 * max|partial sum|, far inside rtol = atol = 1e-4 on
outputs of O(10). bf16/fp16 activations with K % 32 == 16 take the same path, widened exactly, the
result rounded once to the input dtype (bf16: 2^-8 relative), so rtol = 1e-2 there.
bf16/fp16 activations with K % 32 == 0 are quantized to int8 per group of 32 (llama.cpp's Q8_0 dot):
the kernel must equal that scheme's formula up to float32 summation and the one rounding of the
result (bf16 2^-8, fp16 2^-11 relative), and stay within the scheme's own error bound of the exact
linear: each activation moves by at most half its group's step d_g = max|x_g| / 127.
The int4 GEMV (bf16/fp16 activations only) is the same activation scheme against the dequantized
4-bit weights (llama.cpp's Q4_1 x Q8_1): the same two checks, with the int4 weights' |w| in the bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from smolvlm import cpu, kernels
from smolvlm.quantization import Int8Linear
from smolvlm.quantization.int8 import KERNEL_MAX_ROWS

AVX2 = kernels._cpu_problem() is None
needs_kernel = pytest.mark.skipif(not AVX2, reason=f"no CPU kernels on this machine: {kernels._cpu_problem()}")


@needs_kernel
def test_the_kernel_builds_here():
    """The test environment has what the build needs (g++ from tools/install-chromium.sh, ninja
    from the package's dependencies): a failure here means users with AVX2 lose the fast path."""
    assert kernels.build() is None


def _reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.double() @ (w.double() * s.double()[:, None]).t()).float()


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    """int8 weights over the whole range (-128 too), activations of uneven size within each group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.02
    x = (torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 3).to(dtype)
    return x, w, s


def _q8_formula(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-32 int8 activation scheme in float64 (its float32 steps as the kernel takes them):
    (y, the bound on |y - exact|)."""
    m, k = x.shape
    xg = x.float().reshape(m, k // 32, 32)
    d = xg.abs().amax(-1) / 127  # float32, as the kernel
    q = torch.round(xg * torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None])  # half to even
    wg = w.double().reshape(w.shape[0], k // 32, 32)
    y = (torch.einsum("mgk,ngk->mng", q.double(), wg) * d.double()[:, None, :]).sum(-1) * s.double()
    bound = (d.double()[:, None, :] / 2 * wg.abs().sum(-1)[None]).sum(-1) * s.double()
    return y, bound


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 96, 128), (3, 97, 128), (KERNEL_MAX_ROWS, 1536, 576), (1, 5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_gemv_is_the_dequantized_linear(m, n, k, dtype):
    """float32 activations (and bf16/fp16 where K % 32 == 16): every row of x against every row of w
    (odd N: 97, 5), the exact linear up to summation order, in x's dtype."""
    assert kernels.build() is None
    x, w, s = _inputs(m, n, k, dtype, m * n + k)
    if dtype != torch.float32 and k % 32 == 0:
        x = x[:, :-16].contiguous()  # K % 32 == 16: the float path
        w = w[:, :-16].contiguous()
    got = torch.ops.smolvlm.int8_gemv(x, w, s)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(got.float(), _reference(x, w, s), **tol)


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 96, 128), (3, 97, 576), (KERNEL_MAX_ROWS, 1536, 576), (1, 5, 32), (2, 7, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_and_fp16_activations_are_quantized_per_32(m, n, k, dtype):
    """bf16/fp16 activations, K % 32 == 0: the Q8_0-style scheme exactly (up to float32 summation
    and the result's one rounding), and within its error bound of the exact linear."""
    assert kernels.build() is None
    x, w, s = _inputs(m, n, k, dtype, m * n + k)
    if k > 32:
        x[0, :32] = 0  # a group of zeros (scale 0) contributes nothing
    got = torch.ops.smolvlm.int8_gemv(x, w, s)
    assert got.dtype == dtype and got.shape == (m, n)
    y, bound = _q8_formula(x, w, s)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert_close(got.double(), y, rtol=rounding, atol=1e-4 * y.abs().max().item())
    err = (got.double() - _reference(x, w, s).double()).abs()
    assert (err <= bound + rounding * y.abs() + 1e-4).all()
    assert (err > 1e-3 * y.abs()).any()  # the activations really were rounded (not the float path)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_is_never_hidden(bad):
    """The quantized path cannot carry inf/NaN through an int8 code: such a call takes the float
    path, so the row shows it (as the dequantized linear would) instead of a finite wrong number."""
    assert kernels.build() is None
    x, w, s = _inputs(2, 6, 64, torch.bfloat16, 0)
    x[1, 3] = bad
    got = torch.ops.smolvlm.int8_gemv(x, w, s).float()
    assert not got[1].isfinite().any()
    assert_close(got[0], _reference(x[:1], w, s)[0], rtol=1e-2, atol=1e-2)


@needs_kernel
def test_int8_gemv_refuses_what_it_cannot_do():
    assert kernels.build() is None
    w, s = torch.zeros(8, 24, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.smolvlm.int8_gemv(torch.zeros(1, 24), w, s)
    with pytest.raises(RuntimeError, match="w int8"):
        torch.ops.smolvlm.int8_gemv(torch.zeros(1, 16), torch.zeros(8, 16), s)


def _layer(k: int = 128, n: int = 96) -> Int8Linear:
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return Int8Linear.from_linear(lin)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_runs_the_kernel_for_decode_rows_only(monkeypatch, dtype):
    """Up to KERNEL_MAX_ROWS rows without autograd go to the kernel; prefill-sized inputs and inputs
    that need a gradient (QLoRA training: the op has no backward) take PyTorch's paths, whose
    results agree with it. (Forced on: AMX CPUs leave it off by default, see the last test.)"""
    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    calls = []
    op = torch.ops.smolvlm.int8_gemv
    monkeypatch.setattr(torch.ops.smolvlm, "int8_gemv", lambda *a: calls.append(a[0].shape) or op(*a))
    q = _layer().to(dtype)
    ref = lambda x: nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())  # noqa: E731
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    x = torch.randn(1, 3, 128).to(dtype)
    assert_close(q(x).float(), ref(x), **tol)
    assert calls == [(3, 128)]
    assert q(torch.randn(1, KERNEL_MAX_ROWS + 1, 128).to(dtype)).shape == (1, KERNEL_MAX_ROWS + 1, 96)
    assert len(calls) == 1
    xg = torch.randn(2, 128, dtype=dtype, requires_grad=True)
    q(xg).float().sum().backward()
    assert len(calls) == 1
    assert_close(xg.grad.float(), q.dequantized_weight().sum(0).expand(2, -1), **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_avx512_int8_runs_the_kernel_for_a_single_streams_rows_only(monkeypatch, dtype):
    """Where PyTorch's GEMVs run (AVX-512 without AMX: ``ready("gemv")`` false, ``ready("int8_rows")``
    true), smolvlm's int8 GEMV takes one or two bf16 rows (``OWN_ROWS``: a single stream's decode step,
    q/k/v and gate/up in one call) and PyTorch's kernel the rest up to ``KERNEL_MAX_ROWS``; float32
    rows, which PyTorch's kernel does not take, all go to ours; past that, the dequantized linear.
    Every path gives the dequantized linear's numbers (bf16: the per-32 activation rounding)."""
    from smolvlm.quantization.int8 import OWN_ROWS
    from smolvlm.model.packed import fused_outputs

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", "PyTorch's GEMVs, as on AVX-512")
    assert not kernels.ready() and kernels.ready("int8_rows")
    calls = []
    for name in ("int8_gemv", "int8_gemv_cat"):
        op = getattr(torch.ops.smolvlm, name)
        monkeypatch.setattr(torch.ops.smolvlm, name,
                            lambda *a, op=op, name=name: calls.append((name, a[0].shape[0])) or op(*a))
    torch_calls = []
    op = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: torch_calls.append(a[0].shape[0]) or op(*a))
    q = _layer().to(dtype)
    ref = lambda x: nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())  # noqa: E731
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        for rows in range(1, KERNEL_MAX_ROWS + 2):
            x = torch.randn(rows, 128).to(dtype)
            assert_close(q(x).float(), ref(x), **tol)
        ours = OWN_ROWS if dtype == torch.bfloat16 else KERNEL_MAX_ROWS
        assert [r for _, r in calls] == list(range(1, ours + 1))
        assert torch_calls == list(range(ours + 1, KERNEL_MAX_ROWS + 1))
        calls.clear()
        mods = [Int8Linear.from_linear(nn.Linear(128, n, bias=False)).to(dtype) for n in (64, 32)]
        holder = nn.Module()
        holder.a, holder.b = mods
        x = torch.randn(1, 1, 128).to(dtype)
        ya, yb = fused_outputs(holder, "ab", ("a", "b"), x)
        assert calls == [("int8_gemv_cat", 1)]  # both layers of one input in one call
        assert torch.equal(ya, mods[0](x)) and torch.equal(yb, mods[1](x))


@needs_kernel
def test_without_the_kernel_the_same_layer_gives_the_same_numbers(monkeypatch):
    """``SMOLVLM_CPU_KERNELS=0`` (or a failed build) leaves PyTorch's kernels in place."""
    assert kernels.build() is None
    q = _layer()
    x = torch.randn(1, 1, 128)
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    with_kernel = q(x)
    monkeypatch.setitem(kernels._state, "use", "off for this test")
    assert_close(q(x), with_kernel, rtol=1e-5, atol=1e-5)


def test_the_switch_and_the_reasons(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels._compile() == f"{kernels.ENV}=0"
    monkeypatch.delenv(kernels.ENV)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(["avx2", "fma", "avx512f", "amx_tile"]))
    monkeypatch.setattr(kernels, "build", lambda: "c++: not found")
    assert not kernels.prepare() and kernels.problem() == "c++: not found"  # not built: that is why
    assert not any(kernels.ready(kind) for kind in kernels.KINDS)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "build", lambda: None)
    assert not kernels.prepare() and "AMX" in kernels.problem()  # AMX: only the fused step's kernels
    assert {kind for kind in kernels.KINDS if kernels.ready(kind)} == set(kernels.ON_AMX)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.prepare() and kernels.ready() and kernels.ready("float_gemv")  # forced: all of them
    monkeypatch.delenv(kernels.ENV)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(["avx2", "fma", "avx512f", "avx512_bf16"]))
    monkeypatch.setattr(kernels, "build", lambda: None)
    assert kernels.prepare() and kernels.problem() is None  # AVX-512 without AMX: the decode attention
    assert kernels.ready("decode_attention") and kernels.ready("bf16_attention") and not kernels.ready()  # ... not the GEMVs
    assert kernels.ready("int8_rows") and kernels.ready("float_gemv")  # ... but int8's few rows and the bf16/f32 GEMV
    assert kernels.ready("decode_layers") and kernels.ready("rms_norm")  # ... and the fused step, the RMSNorm
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(["avx2", "fma"]))
    assert kernels.prepare() and kernels.ready() and kernels.ready("decode_attention")  # AVX2 only: all of them
    assert not kernels.ready("bf16_attention") and "AVX-512 BF16" in kernels._state["bf16_attention"]  # ... it can run
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert "Linux x86-64 only" in kernels._cpu_problem()


def test_a_failed_build_is_said_once_and_falls_back(monkeypatch, capsys):
    """No compiler (or ninja): one line on stderr, then PyTorch's kernel; never an exception."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_cpu_problem", lambda: None)
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(["avx2", "fma"]))

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension 'smolvlm_cpu_kernels': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda *a, **k: "/nonexistent/smolvlm_cpu_kernels")
    assert not kernels.prepare() and not kernels.ready()
    assert "did not build" in kernels.problem() and "c++: not found" in kernels.problem()
    err = capsys.readouterr().err
    assert err.count("PyTorch's slower kernel") == 1
    q = _layer()
    x = torch.randn(1, 128)
    assert_close(q(x), nn.functional.linear(x, q.dequantized_weight(), q.bias), rtol=1e-5, atol=1e-5)


def _cache_slices(b: int, hkv: int, length: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as the model passes them: the first ``length`` slots of a longer fp32 cache (strided)."""
    kc, vc = (torch.randn(b, hkv, length + 5, d, generator=g) for _ in range(2))
    return kc[:, :, :length], vc[:, :, :length]


@needs_kernel
@pytest.mark.parametrize("b,hq,hkv,length", [(1, 9, 3, 256), (2, 4, 4, 37), (1, 2, 1, 1), (1, 15, 5, 700), (2, 32, 8, 300)])
@pytest.mark.parametrize("mask_rows", [None, 1, "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
def test_decode_attention_is_sdpa_over_an_fp32_cache(b, hq, hkv, length, mask_rows, dtype, cache):
    """One query per row, grouped heads, with or without a (1 or B, 1, 1, L) mask, over an fp32 or a
    bf16 cache: PyTorch's SDPA in float32 over the cache's values (bf16 ones widened exactly), rounded
    once to q's dtype. Both sum ~L*D float32 products of O(1) in other orders: atol 1e-5 on outputs
    of O(1) for float32; bf16/fp16 round both once, so near a rounding boundary they may land one
    unit in the last place apart (2^-7, 2^-10 relative)."""
    assert kernels.build() is None
    g = torch.Generator().manual_seed(b * 100 + length)
    q = torch.randn(b, 1, hq, 64, generator=g).to(dtype).transpose(1, 2)  # (B, Hq, 1, D) as the model's
    k, v = _cache_slices(b, hkv, length, 64, g)
    if cache == torch.bfloat16:  # slices of a bf16 cache, strided as the fp32 ones
        kc, vc = (torch.empty(b, hkv, length + 5, 64, dtype=cache) for _ in range(2))
        kc[:, :, :length], vc[:, :, :length] = k, v
        k, v = kc[:, :, :length], vc[:, :, :length]
    mask = None
    if mask_rows is not None:
        mask = torch.rand(b if mask_rows == "B" else 1, 1, 1, length, generator=g) < 0.6
        mask[..., 0] = True
    got = torch.ops.smolvlm.decode_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=hq != hkv).to(dtype)
    assert got.dtype == dtype and got.shape == (b, hq, 1, 64) and got.is_contiguous()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert_close(got.float(), want.float(), rtol=rtol, atol=1e-5)


@needs_kernel
def test_decode_attention_edge_cases():
    """A row that may attend nowhere gives zeros (as SDPA); a NaN key shows in the output; shapes it
    cannot take are refused."""
    assert kernels.build() is None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 8, generator=g)
    k, v = _cache_slices(2, 1, 6, 8, g)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    got = torch.ops.smolvlm.decode_attention(q, k, v, mask)
    assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), rtol=1e-5, atol=1e-6)
    assert (got[1] == 0).all()
    k = k.clone()
    k[0, 0, 2, 3] = float("nan")
    assert torch.ops.smolvlm.decode_attention(q, k, v, None)[0].isnan().all()
    with pytest.raises(RuntimeError, match="one query per row"):
        torch.ops.smolvlm.decode_attention(torch.zeros(2, 2, 3, 8), k, v, None)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        torch.ops.smolvlm.decode_attention(q, k.half(), v.half(), None)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        torch.ops.smolvlm.decode_attention(q, k, v.bfloat16(), None)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.smolvlm.decode_attention(q, k, v, torch.ones(2, 1, 1, 5, dtype=torch.bool))


@needs_kernel
@pytest.mark.parametrize("dot", [True, False])
def test_bf16_decode_attention_over_key_chunks_both_paths(dot):
    """A bf16 query over a bf16 cache with D % 32 == 0 takes the AVX-512 BF16 path where the CPU has it
    (``bf16_decode_attention.cpp``: 256-key chunks merged at the end), else (``dot`` False, or no such
    CPU) the AVX2 loop: either way SDPA's numbers up to one bf16 rounding, for a NaN key in a later chunk,
    a row with no visible key, and a row whose only visible key is in its last chunk."""
    assert kernels.build() is None
    torch.ops.smolvlm.use_bf16_dot(dot and kernels.cpu.has("avx512_bf16"))
    try:
        g = torch.Generator().manual_seed(5)
        q = torch.randn(3, 8, 1, 64, generator=g).bfloat16()
        k, v = (torch.randn(3, 2, 600, 64, generator=g).bfloat16() for _ in range(2))
        mask = torch.ones(3, 1, 1, 600, dtype=torch.bool)
        mask[1] = False  # nothing visible: zeros
        mask[2, ..., :599] = False  # one key, in the last chunk: its value
        got = torch.ops.smolvlm.decode_attention(q, k, v, mask)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        assert_close(got[0].float(), want[0], rtol=2.0**-7, atol=1e-5)
        assert (got[1] == 0).all() and torch.equal(got[2], v[2, :, 599:600].repeat_interleave(4, 0))
        k[0, 1, 400, 5] = float("nan")  # KV head 1 of row 0, in its second chunk: that row's heads 4-7 only
        got = torch.ops.smolvlm.decode_attention(q, k, v, None)
        assert got[0, 4:].isnan().all() and not got[0, :4].isnan().any() and not got[1:].isnan().any()
    finally:
        torch.ops.smolvlm.use_bf16_dot(kernels.cpu.has("avx512_bf16"))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_takes_the_kernel_for_one_query_over_a_cache(monkeypatch, dtype):
    """``layers.attention``: one query, fp32 or bf16 k/v, no gradient -> the kernel (its numbers are
    SDPA's, as above); a prompt (T > 1), a causal call, an fp16 cache or a query that needs a gradient
    keep SDPA."""
    from smolvlm.model.layers import attention

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    calls = []
    op = torch.ops.smolvlm.decode_attention
    monkeypatch.setattr(torch.ops.smolvlm, "decode_attention", lambda *a: calls.append(a[0].shape) or op(*a))
    g = torch.Generator().manual_seed(1)
    k, v = _cache_slices(1, 3, 40, 64, g)
    q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
    mask = torch.rand(1, 1, 1, 40, generator=g) < 0.5
    out = attention(q, k, v, mask)
    assert calls == [(1, 9, 1, 64)] and out.shape == (1, 1, 9 * 64) and out.dtype == dtype
    monkeypatch.setitem(kernels._state, "use", "off for this test")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2.0**-8, atol=1e-5)
    assert_close(out, attention(q, k, v, mask), **tol)
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    attention(torch.randn(1, 9, 4, 64).to(dtype), k, v, torch.ones(1, 1, 4, 40, dtype=torch.bool))
    attention(q, k, v, None, is_causal=True)
    attention(q, k.half(), v.half(), mask)
    attention(q.float().detach().requires_grad_(), k, v, mask)
    assert len(calls) == 1
    attention(q, k.bfloat16(), v.bfloat16(), mask)
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_cat_is_each_layer_side_by_side(dtype):
    """Layers of one input (q/k/v: 96, 32, 32 rows) in one call: exactly each call's numbers (same
    rows, same activation rounding), concatenated; mismatched parts are refused."""
    assert kernels.build() is None
    x, w, s = _inputs(3, 160, 128, dtype, 7)
    ws, ss = list(w.split([96, 32, 32])), list(s.split([96, 32, 32]))
    ws, ss = [t.contiguous() for t in ws], [t.contiguous() for t in ss]
    got = torch.ops.smolvlm.int8_gemv_cat(x, ws, ss)
    assert torch.equal(got, torch.cat([torch.ops.smolvlm.int8_gemv(x, a, b) for a, b in zip(ws, ss)], -1))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.smolvlm.int8_gemv_cat(x, [ws[0], ws[1][:, :64].contiguous()], ss[:2])
    with pytest.raises(RuntimeError, match="as many scales"):
        torch.ops.smolvlm.int8_gemv_cat(x, ws, ss[:2])


@needs_kernel
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_q_k_v_and_gate_up_run_in_one_kernel_call(monkeypatch, bits):
    """``fused_outputs`` over Int8Linear/Int4Linear parts: one ``*_gemv_cat`` call, the numbers of one
    call each; a part of another kind (a LoRA wrapper) or a prompt-sized input: each part alone."""
    from smolvlm.model.packed import fused_outputs
    from smolvlm.quantization import Int4Linear
    from smolvlm.quantization.int4 import KERNEL_MAX_ROWS as INT4_ROWS

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    owner = nn.Module()
    names = ("q_proj", "k_proj", "v_proj")
    for name, n in zip(names, (96, 32, 32)):
        lin = nn.Linear(128, n, bias=False)
        layer = Int8Linear.from_linear(lin) if bits == "int8" else Int4Linear.from_linear(lin, 32)
        setattr(owner, name, layer.to(torch.bfloat16))
    calls = []
    op = getattr(torch.ops.smolvlm, f"{bits}_gemv_cat")
    monkeypatch.setattr(torch.ops.smolvlm, f"{bits}_gemv_cat", lambda *a: calls.append(len(a[1])) or op(*a))
    x = torch.randn(2, 1, 128).bfloat16()
    together = fused_outputs(owner, "qkv_proj", names, x)
    assert calls == [3] and [t.shape for t in together] == [(2, 1, 96), (2, 1, 32), (2, 1, 32)]
    for t, name in zip(together, names):
        assert torch.equal(t, getattr(owner, name)(x))
    rows = KERNEL_MAX_ROWS if bits == "int8" else INT4_ROWS
    fused_outputs(owner, "qkv_proj", names, torch.randn(1, rows + 1, 128).bfloat16())
    owner.k_proj = nn.Sequential(owner.k_proj)  # wrapped: no longer the parts' class
    assert torch.equal(fused_outputs(owner, "qkv_proj", names, x)[1], owner.k_proj(x))
    assert calls == [3]


# -- int4 -----------------------------------------------------------------------------------------
def _int4_inputs(m: int, n: int, k: int, g: int, dtype: torch.dtype, seed: int):
    """4-bit values over 0..15, per-group scales and zeros as ``quantize_int4`` makes them, activations
    of uneven size within each block of 32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-4
    zeros = (torch.rand(n, k // g, generator=gen) - 0.5) * 0.05
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen) * 3).to(dtype)
    return x, q, scales, zeros


def _q4_formula(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """llama.cpp's Q4_1 x Q8_1 scheme in float64: the dequantized weights times the activations
    quantized per 32 (d_b * round(x / d_b)); (y, the bound on |y - exact|: each activation moves by at
    most d_b / 2)."""
    from smolvlm.quantization.int4 import dequantize_int4

    m, k = x.shape
    w = dequantize_int4(q, scales.float(), zeros.float()).double()  # (N, K)
    xb = x.float().reshape(m, k // 32, 32)
    d = xb.abs().amax(-1) / 127  # float32, as the kernel
    xq = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None])  # half to even
    y = (xq.double() * d.double()[..., None]).reshape(m, k) @ w.t()
    bound = (d.double().repeat_interleave(32, -1) / 2) @ w.abs().t()
    return y, bound


@needs_kernel
@pytest.mark.parametrize("m,n,k,g", [(1, 96, 128, 32), (3, 97, 576, 64), (KERNEL_MAX_ROWS, 1536, 576, 32),
                                     (2, 7, 1536, 256), (1, 5, 160, 32), (4, 33, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_is_the_q4_1_by_q8_1_scheme(m, n, k, g, dtype, table_dtype):
    """Every row of x (odd counts of blocks: K = 160) against every row of w (odd N) and group sizes
    32-256: the scheme's formula up to float32 arithmetic and the result's one rounding (bf16 2^-8,
    fp16 2^-11 relative), and within its error bound of the exact dequantized linear."""
    from smolvlm.quantization.int4 import pack_nibbles

    assert kernels.build() is None
    x, q, scales, zeros = _int4_inputs(m, n, k, g, dtype, m * n + k + g)
    if k > 32:
        x[0, 32:64] = 0  # a block of zeros (scale 0) contributes nothing
    scales, zeros = scales.to(table_dtype), zeros.to(table_dtype)  # the kernel's table holds these values
    got = torch.ops.smolvlm.int4_gemv(x, pack_nibbles(q), torch.stack((scales, zeros), -1))
    assert got.dtype == dtype and got.shape == (m, n)
    y, bound = _q4_formula(x, q, scales, zeros)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert_close(got.double(), y, rtol=rounding, atol=1e-4 * y.abs().max().item())
    from smolvlm.quantization.int4 import dequantize_int4

    exact = x.double() @ dequantize_int4(q, scales.float(), zeros.float()).double().t()
    err = (got.double() - exact).abs()
    assert (err <= bound + rounding * y.abs() + 1e-4).all()
    assert (err > 1e-3 * y.abs()).any()  # the activations really were rounded


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int4_gemv_never_hides_a_non_finite_activation(bad):
    from smolvlm.quantization.int4 import dequantize_int4, pack_nibbles

    assert kernels.build() is None
    x, q, scales, zeros = _int4_inputs(2, 6, 64, 32, torch.bfloat16, 0)
    x[1, 3] = bad
    got = torch.ops.smolvlm.int4_gemv(x, pack_nibbles(q), torch.stack((scales, zeros), -1)).float()
    assert not got[1].isfinite().any()
    exact = x[:1].float() @ dequantize_int4(q, scales, zeros).t()
    assert_close(got[0], exact[0], rtol=1e-2, atol=1e-2)  # float path: only the result's bf16 rounding


@needs_kernel
def test_int4_gemv_refuses_what_it_cannot_do():
    assert kernels.build() is None
    w, t = torch.zeros(8, 96, dtype=torch.uint8), torch.ones(8, 6, 2)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.smolvlm.int4_gemv(torch.zeros(1, 192), w, t)
    with pytest.raises(RuntimeError, match="32 times a power of two"):  # groups of 96
        torch.ops.smolvlm.int4_gemv(torch.zeros(1, 192).bfloat16(), w, torch.ones(8, 2, 2))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.smolvlm.int4_gemv(torch.zeros(1, 48).bfloat16(), torch.zeros(8, 24, dtype=torch.uint8), t)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.smolvlm.int4_gemv(torch.zeros(1, 128).bfloat16(), w, t)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.smolvlm.int4_gemv_cat(torch.zeros(1, 192).bfloat16(), [w, w], [t, t.bfloat16()])


@needs_kernel
def test_int4_gemv_cat_is_each_layer_side_by_side():
    from smolvlm.quantization.int4 import pack_nibbles

    assert kernels.build() is None
    x, q, scales, zeros = _int4_inputs(3, 160, 128, 32, torch.bfloat16, 7)
    ws = [pack_nibbles(t) for t in q.split([96, 32, 32])]
    ts = [t.contiguous() for t in torch.stack((scales, zeros), -1).split([96, 32, 32])]
    got = torch.ops.smolvlm.int4_gemv_cat(x, ws, ts)
    assert torch.equal(got, torch.cat([torch.ops.smolvlm.int4_gemv(x, a, b) for a, b in zip(ws, ts)], -1))


def _int4_layer(k: int = 128, n: int = 96, bias: bool = True):
    from smolvlm.quantization import Int4Linear

    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return Int4Linear.from_linear(lin, 32)


@needs_kernel
def test_int4_linear_runs_the_kernel_for_bf16_and_fp16_rows_keeping_one_copy(monkeypatch):
    """bf16/fp16 rows up to KERNEL_MAX_ROWS (int4's) go to smolvlm's kernel, float32 ones to PyTorch's,
    longer inputs dequantize. The saved nibbles are the kernel's weights as they are; its (N, G, 2)
    table (bf16 for bf16 activations) is the one copy of the scales and zeros, saved as float32. A
    layer used first by PyTorch's kernel (its own layout) gets its nibbles back for smolvlm's."""
    from smolvlm.quantization.int4 import KERNEL_MAX_ROWS as ROWS

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    calls = []
    op = torch.ops.smolvlm.int4_gemv
    monkeypatch.setattr(torch.ops.smolvlm, "int4_gemv", lambda *a: calls.append(a[0].shape) or op(*a))
    m = _int4_layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 3, 128)
    with torch.inference_mode():
        want = nn.functional.linear(x, m.dequantized_weight(), m.bias)
        assert_close(m(x), want, rtol=1e-5, atol=1e-5)  # float32: PyTorch's kernel
        assert calls == [] and m._kernel[0] == "torch"
        for dtype, table in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
            got = m.to(dtype)(x.to(dtype))
            assert got.dtype == dtype and calls[-1] == (3, 128)
            assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
            kind, w, t = m._kernel
            assert kind == "own" and w is m.weight_uint4 and not m._kernel_layout
            assert t.shape == (96, 4, 2) and t.dtype == table
            assert m.scales.untyped_storage().data_ptr() == m.zeros.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        n = len(calls)
        assert m(torch.randn(ROWS + 1, 128).half()).shape == (ROWS + 1, 96) and len(calls) == n
    after = m.state_dict()
    assert torch.equal(after["weight_uint4"], before["weight_uint4"])
    for k in ("scales", "zeros"):  # bf16-rounded by the bf16 table, then carried as float32
        assert after[k].dtype == torch.float32 and torch.equal(after[k], before[k].bfloat16().float()), k


# -- bf16 -----------------------------------------------------------------------------------------
# The bf16 GEMV widens both operands exactly and sums in float32, then rounds once to bf16: against the
# float64 product of the same bf16 values, each output is off by its rounding (2^-9 relative, rtol
# 2^-8 allows for the float32 sum beside it) plus float32 summation error over K <= 1536 terms
# (~K * 2^-24 * sum|x w|, far inside atol = 1e-3 * sum|x w|).
def _bf16_reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.double() @ w.double().t(), x.double().abs() @ w.double().abs().t()


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 96, 128), (1, 5, 8), (1, 33, 24), (3, 97, 576), (4, 64, 1536),
                                   (7, 1536, 576), (5, 33, 40)])
def test_bf16_gemv_is_the_bf16_linear(m, n, k):
    assert kernels.build() is None
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = (torch.randn(m, k, generator=g) * 3).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    got = torch.ops.smolvlm.bf16_gemv(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    want, scale = _bf16_reference(x, w)
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-3 * scale).all()
    assert_close(got.float(), F.linear(x, w).float(), rtol=2**-7, atol=1e-3 * scale.max().item())


@needs_kernel
def test_the_bf16_gemvs_path_follows_pytorchs_isa_level():
    """One bf16 row takes the AVX-512 BF16 dot instruction only where the CPU has it *and* PyTorch runs at its
    AVX-512 level (``smolvlm.cpu``: an AVX2-only run, ATEN_CPU_CAPABILITY=avx2, takes the widening loop). The
    instruction treats bf16 subnormals as zero; the widening loop multiplies them exactly. So 64 weights of
    1e-39 times 1 give 0 through the one and about 6.4e-38 through the other."""
    assert kernels.build() is None
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    w = torch.full((3, 64), 1e-39).bfloat16()
    assert 0 < float(w[0, 0]) < torch.finfo(torch.bfloat16).tiny  # a subnormal bf16
    got = torch.ops.smolvlm.bf16_gemv(x, w).float()
    if cpu.has("avx512_bf16"):
        assert torch.equal(got, torch.zeros(1, 3))
    else:
        assert_close(got, (w.float() * x.float()).sum(-1)[None], rtol=2**-7, atol=0)


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 96, 128), (1, 5, 8), (1, 33, 24), (3, 97, 576), (4, 64, 1536),
                                   (7, 1536, 576), (5, 33, 40)])
def test_f32_gemv_is_the_float32_linear_up_to_summation_order(m, n, k):
    """Float32 products summed in float32 in another order than the float64 reference: within the
    classic bound of k units of roundoff (2^-24) times sum |x| |w| (each output rounded once)."""
    assert kernels.build() is None
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g) * 3, torch.randn(n, k, generator=g) * 0.05
    got = torch.ops.smolvlm.f32_gemv(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    want, scale = _bf16_reference(x, w)
    assert ((got.double() - want).abs() <= k * 2**-24 * scale).all()
    ws = [w, torch.randn(7, k, generator=g)]
    assert torch.equal(torch.ops.smolvlm.f32_gemv_cat(x, ws), torch.cat([torch.ops.smolvlm.f32_gemv(x, v) for v in ws], -1))
    with pytest.raises(RuntimeError, match="x \\(M, K\\) float32"):
        torch.ops.smolvlm.f32_gemv(x.bfloat16(), w)


@needs_kernel
def test_bf16_gemv_cat_is_each_layer_side_by_side():
    assert kernels.build() is None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 576, generator=g).bfloat16()
    ws = [torch.randn(n, 576, generator=g).bfloat16() for n in (576, 192, 192)]
    together = torch.ops.smolvlm.bf16_gemv_cat(x, ws)
    assert torch.equal(together, torch.cat([torch.ops.smolvlm.bf16_gemv(x, w) for w in ws], -1))


@needs_kernel
def test_bf16_gemv_refuses_what_it_cannot_do():
    assert kernels.build() is None
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    for bad_x, bad_w, why in ((x.float(), w, "x \\(M, K\\) bfloat16"), (x, w.float(), "w \\(N, K\\) bfloat16"),
                              (x[:, :60], w[:, :60], "multiple of 8"), (x, w.t().contiguous().t(), "contiguous"),
                              (x, torch.randn(8, 32).bfloat16(), "K as x's")):
        with pytest.raises(RuntimeError, match=why):
            torch.ops.smolvlm.bf16_gemv(bad_x, bad_w)


def _record_gemv_calls(monkeypatch) -> list[str]:
    """The names of the bf16 GEMV ops called from now on (they still run)."""
    calls: list[str] = []
    for name in ("bf16_gemv", "bf16_gemv_cat"):
        op = getattr(torch.ops.smolvlm, name)
        monkeypatch.setattr(torch.ops.smolvlm, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    return calls


@torch.no_grad()
def _check_decode_rows(owner: nn.Module, names: tuple[str, ...], calls: list[str]) -> torch.Tensor:
    """Two one-token rows through ``owner``'s q/k/v (96, 32, 32 wide, K 128): q alone runs the GEMV,
    the three together one GEMV call (``fused_outputs``), each as it computes alone. Returns the rows."""
    from smolvlm.model.packed import fused_outputs

    x = torch.randn(2, 1, 128).bfloat16()
    y = owner.q_proj(x)
    assert calls == ["bf16_gemv"] and y.shape == (2, 1, 96)
    assert_close(y.float(), F.linear(x.float(), owner.q_proj.weight.float()), rtol=2**-7, atol=1e-2)
    parts = fused_outputs(owner, "qkv_proj", names, x)
    assert calls[-1] == "bf16_gemv_cat" and [p.shape[-1] for p in parts] == [96, 32, 32]
    for p, name in zip(parts, names):
        assert torch.equal(p, getattr(owner, name)(x))
    return x


@needs_kernel
def test_upcast_linear_runs_the_bf16_gemv_for_decode_rows_only(monkeypatch):
    """``UpcastLinear`` (bf16 layers on CPUs without fast bf16 GEMMs): bias-free, narrow, no-grad bf16
    calls go to the bf16 GEMV, alone or q/k/v together through ``fused_outputs``; wide calls compute in
    float32, a layer with a bias, an input needing a gradient and kernels turned off keep PyTorch's."""
    from smolvlm.model.packed import fused_outputs
    from smolvlm.model.upcast import MIN_ROWS, upcast_slow_bf16

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    calls = _record_gemv_calls(monkeypatch)
    torch.manual_seed(0)
    owner = nn.Module()
    names = ("q_proj", "k_proj", "v_proj")
    for name, n in zip(names, (96, 32, 32)):
        setattr(owner, name, nn.Linear(128, n, bias=False).bfloat16())
    upcast_slow_bf16(owner, force=True)
    x = _check_decode_rows(owner, names, calls)
    with torch.no_grad():
        calls.clear()
        wide = torch.randn(1, MIN_ROWS, 128).bfloat16()  # a prompt: float32 GEMMs, alone or together
        owner.q_proj(wide)
        assert all(p.shape[1] == MIN_ROWS for p in fused_outputs(owner, "qkv_proj", names, wide))
        biased = nn.Linear(128, 8).bfloat16()
        upcast_slow_bf16(biased, force=True)
        biased(x)
        monkeypatch.setitem(kernels._state, "use", "off for this test")
        owner.q_proj(x)
        assert calls == []
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    xg = x.clone().requires_grad_()
    owner.q_proj(xg).sum().backward()  # the kernel has no backward: PyTorch's GEMV, a gradient comes back
    assert calls == [] and xg.grad is not None and owner.q_proj.weight.grad is not None


@needs_kernel
def test_gemv_linear_runs_the_kernel_for_decode_rows_and_bf16_for_prompts(monkeypatch):
    """``GemvLinear`` (a bf16 model's unpacked text linears where the bf16 GEMV pays: AVX-512 without
    AMX): narrow no-grad calls run the kernel, alone or q/k/v together; wide calls are ``F.linear`` in
    bf16 itself (no float32 copy: this CPU's oneDNN has bf16), bit for bit; kernels off: PyTorch's.
    The loader's policy follows ``kernels.ready("float_gemv")``."""
    from smolvlm.model.packed import packing_pays
    from smolvlm.model.upcast import MIN_ROWS, GemvLinear, gemv_text_linears, text_gemv_pays, bf16_is_slow

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    calls = _record_gemv_calls(monkeypatch)
    torch.manual_seed(0)
    owner = nn.Module()
    owner.model = nn.Module()
    owner.model.text_model = nn.Module()
    attn = owner.model.text_model
    names = ("q_proj", "k_proj", "v_proj")
    for name, n in zip(names, (96, 32, 32)):
        setattr(attn, name, nn.Linear(128, n, bias=False).bfloat16())
    owner.lm_head = nn.Linear(128, 40, bias=False).bfloat16()
    owner.other = nn.Linear(128, 8, bias=False).bfloat16()  # not a text linear: left alone
    assert gemv_text_linears(owner, force=True) == ["model.text_model.q_proj", "model.text_model.k_proj",
                                                    "model.text_model.v_proj", "lm_head"]
    assert type(owner.other) is nn.Linear and isinstance(owner.lm_head, GemvLinear)
    x = _check_decode_rows(attn, names, calls)
    with torch.no_grad():
        calls.clear()
        wide = torch.randn(1, MIN_ROWS, 128).bfloat16()
        assert torch.equal(attn.q_proj(wide), F.linear(wide, attn.q_proj.weight)) and calls == []
        monkeypatch.setitem(kernels._state, "use", "off for this test")
        assert not kernels.ready("float_gemv") and not text_gemv_pays(torch.bfloat16)
        assert torch.equal(attn.q_proj(x), F.linear(x, attn.q_proj.weight)) and calls == []
    monkeypatch.setitem(kernels._state, "use", None)
    assert text_gemv_pays(torch.bfloat16) == (not bf16_is_slow())
    assert text_gemv_pays(torch.float32)  # ours over MKL's (AVX-512) and over oneDNN's packed float32 (AVX2)
    assert not text_gemv_pays(torch.float16)


@needs_kernel
def test_a_float32_gemv_linear_runs_the_f32_gemv_for_decode_rows(monkeypatch):
    """``GemvLinear`` of float32 weights (``text_gemv_pays``: wherever the kernel runs): narrow
    no-grad float32 calls (up to ``F32_GEMV_ROWS`` rows, a batched decode step's) run ``f32_gemv`` (q/k/v
    together: ``f32_gemv_cat``), within float32 summation of ``F.linear``; wider calls are
    ``packed.wide_linear`` (``F.linear``, or oneDNN's GEMM where MKL runs AVX2 code: the same products,
    another summation order); a bf16 input to a float32 layer is PyTorch's."""
    from smolvlm.model.packed import fused_outputs
    from smolvlm.model.upcast import F32_GEMV_ROWS, GemvLinear

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    calls: list[str] = []
    for name in ("f32_gemv", "f32_gemv_cat"):
        op = getattr(torch.ops.smolvlm, name)
        monkeypatch.setattr(torch.ops.smolvlm, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    torch.manual_seed(0)
    owner = nn.Module()
    names = ("q_proj", "k_proj", "v_proj")
    for name, n in zip(names, (96, 32, 32)):
        lin = nn.Linear(128, n, bias=False)
        lin.__class__ = GemvLinear
        setattr(owner, name, lin)
    with torch.no_grad():
        x = torch.randn(2, 1, 128)
        y = owner.q_proj(x)
        assert calls == ["f32_gemv"]
        assert_close(y, F.linear(x, owner.q_proj.weight), rtol=1e-5, atol=1e-5)
        parts = fused_outputs(owner, "qkv_proj", names, x)
        assert calls[-1] == "f32_gemv_cat"
        for part, name in zip(parts, names):
            assert torch.equal(part, getattr(owner, name)(x))
        calls.clear()
        rows = torch.randn(F32_GEMV_ROWS, 128)
        assert_close(owner.q_proj(rows), F.linear(rows, owner.q_proj.weight), rtol=1e-5, atol=1e-5)
        assert calls == ["f32_gemv"]
        calls.clear()
        wide = torch.randn(1, F32_GEMV_ROWS + 1, 128)
        assert_close(owner.q_proj(wide), F.linear(wide, owner.q_proj.weight), rtol=1e-5, atol=1e-5)
        assert calls == []
        assert owner.q_proj.decode_weights(torch.float32)[0] == "f32" and owner.q_proj.decode_weights(torch.bfloat16) is None


# -- RMSNorm ---------------------------------------------------------------------------------------
def _rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: the float32 cast normalised, cast back, times the weight in x's dtype."""
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [576, 960, 72])
def test_rms_norm_kernel_is_the_reference(dtype, d):
    """One call = the reference's steps. Its mean of squares is summed in double, PyTorch's in float32
    in another order: the two means can differ in their last bit (relative 2^-24), which can move the
    rounded normalised value by one unit of its dtype, and the product with the weight, rounded again,
    by up to one more: so float32 within 1e-6 relative, bf16/fp16 within two units (2 * 2^-7 /
    2 * 2^-10 relative), and almost every bf16/fp16 output equal."""
    assert kernels.build() is None
    g = torch.Generator().manual_seed(d)
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    x = (torch.randn(2, 33, d, generator=g) * torch.rand(2, 33, 1, generator=g) * 4).to(dtype)
    got, ref = torch.ops.smolvlm.rms_norm(x, w, 1e-5), _rms_reference(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    unit = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}[dtype]
    assert_close(got.float(), ref.float(), rtol=unit, atol=1e-6)
    if dtype != torch.float32:
        assert (got != ref).float().mean() < 0.01
    xt = x.transpose(0, 1)  # not contiguous: read in its logical order
    assert_close(torch.ops.smolvlm.rms_norm(xt, w, 1e-5).float(), _rms_reference(xt, w, 1e-5).float(),
                 rtol=unit, atol=1e-6)
    zero = torch.zeros(1, d, dtype=dtype)  # mean 0: rsqrt(eps), finite
    assert torch.equal(torch.ops.smolvlm.rms_norm(zero, w, 1e-5), zero)
    bad = x[:1, :1].clone()
    bad[0, 0, 3] = float("nan")
    assert torch.isnan(torch.ops.smolvlm.rms_norm(bad, w, 1e-5)).all()  # a NaN row stays NaN


@needs_kernel
def test_rms_norm_kernel_refuses_what_it_cannot_do():
    assert kernels.build() is None
    with pytest.raises(RuntimeError, match="x \\(..., D\\), w \\(D,\\)"):
        torch.ops.smolvlm.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.smolvlm.rms_norm(torch.zeros(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5)


@needs_kernel
def test_rms_norm_module_runs_the_kernel_outside_autograd_only(monkeypatch):
    """``layers.RMSNorm`` calls the kernel where ``ready("rms_norm")``, for inputs of its weight's dtype,
    with no gradient to take; otherwise PyTorch's ops (training, a mixed dtype), with the same numbers."""
    from smolvlm.model.layers import RMSNorm

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    calls = []
    op = torch.ops.smolvlm.rms_norm
    monkeypatch.setattr(torch.ops.smolvlm, "rms_norm", lambda *a: calls.append(a[0].shape) or op(*a))
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        got = norm(x)
    assert calls == [(3, 64)]
    assert_close(got.float(), _rms_reference(x, norm.weight.detach(), 1e-6).float(), rtol=2.0 ** -6, atol=1e-6)
    trained = norm(x)  # grad mode, the weight trains: PyTorch's ops, differentiable
    assert len(calls) == 1 and trained.requires_grad
    trained.float().sum().backward()
    assert norm.weight.grad is not None
    with torch.no_grad():
        norm(x.float())  # float32 input, bf16 weight: the reference's type promotion, PyTorch's ops
    assert len(calls) == 1
    monkeypatch.setitem(kernels._state, "use", "off for this test")
    with torch.no_grad():
        assert_close(norm(x).float(), got.float(), rtol=2.0 ** -6, atol=1e-6)
    assert len(calls) == 1


@needs_kernel
@torch.no_grad()
def test_attention_rotates_q_and_k_of_one_gemv_call_at_once(monkeypatch):
    """An int8 decode step's q/k/v come from one ``int8_gemv_cat`` call, side by side: the attention
    rotates q and k in that one tensor (``packed.joint_outputs``), which is the same elementwise rope
    as rotating each, so the step's output is bit for bit the one of three calls and two rotations."""
    from smolvlm import SmolVLM
    from smolvlm.model import text as text_mod
    from smolvlm.model.layers import rope_tables
    from smolvlm.quantization import quantize
    from tests.helpers import tiny_config

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None)
    torch.manual_seed(0)
    model = quantize(SmolVLM(tiny_config()).eval().to(torch.bfloat16), "int8")
    attn = model.model.text_model.layers[0].self_attn
    assert attn.q_proj.in_features % 32 == 0
    calls = []
    for name in ("int8_gemv", "int8_gemv_cat"):
        op = getattr(torch.ops.smolvlm, name)
        monkeypatch.setattr(torch.ops.smolvlm, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    x = torch.randn(1, 1, attn.q_proj.in_features).bfloat16()
    hd = attn.head_dim
    ang = torch.rand(1, 1, hd)
    cos, sin = rope_tables(ang.cos().bfloat16(), ang.sin().bfloat16())
    joint = attn(x, cos, sin, None)
    assert calls == ["int8_gemv_cat", "int8_gemv"]  # q/k/v in one call, then o_proj
    calls.clear()
    monkeypatch.setattr(text_mod, "joint_outputs", lambda *a: None)  # each layer, each rotation
    alone = attn(x, cos, sin, None)
    assert calls == ["int8_gemv"] * 4
    assert torch.equal(joint, alone)
