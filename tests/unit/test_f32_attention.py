"""smolvlm's float32 attention kernel for whole sequences (``kernels/f32_attention.cpp``: the vision
encoder's SDPA and a prompt's, on AVX-512 CPUs where MKL runs AVX2 code) and ``layers.attention``'s choice of it.

Tolerance. The kernel computes fp32 SDPA's numbers up to summation order: q.k, the softmax and the
product with v in float32, exp by a polynomial of ~2 ulp. Against float64 attention of the same inputs:
a score summed over D products in float32 is off by at most D u scale sum_d |q_d k_d| (u = 2^-24, the
recursive-summation bound), which moves each weight p_j by that much relatively, so the output by that
times max|v|; the exps, their sum, the product with v and the division add a few ulp of |exact| + max|v|
(2^-20 covers them). So |got - exact| <= (D u scale max sum|q||k| + 2^-20)(|exact| + max|v|), a bound
PyTorch's own fp32 SDPA meets too (asserted alongside). It is a worst case (2e-3 to 1e-2 here, where the
measured errors are ~1e-5); a dropped key, a wrong scale or an ignored mask moves outputs by O(0.1-1),
still far outside it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smolvlm import cpu, kernels

AVX512 = cpu.has("avx512f") and kernels._cpu_problem() is None
needs_avx512 = pytest.mark.skipif(not AVX512, reason="the float32 attention kernel needs a CPU with AVX-512 "
                                  f"({kernels._cpu_problem() or 'this one lacks it'}); layers.attention uses SDPA here")


@pytest.fixture(autouse=True)
def _built():
    if AVX512:  # the op exists once the kernels are built (cached after the first build)
        assert kernels.build() is None


def _qkv(b: int, h: int, t: int, d: int, seed: int, hkv: int | None = None) -> tuple[torch.Tensor, ...]:
    """q, k, v as the vision encoder passes them: head views of one fused (B, T, 3, H, D) projection
    (strided, last dim contiguous), values of O(1-3); ``hkv``: fewer KV heads (grouped, contiguous)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 3, h, d, generator=g) * 2
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    if hkv is not None:
        k, v = k[:, :hkv].contiguous(), v[:, :hkv].contiguous()
    return q, k, v


def _assert_within_bound(got: torch.Tensor, q, k, v, mask, causal: bool = False) -> None:
    b, h, t, d = q.shape
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal,
                                           enable_gqa=True).transpose(1, 2).reshape(b, t, h * d)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=True).transpose(1, 2).reshape(b, t, h * d)
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.double().abs().repeat_interleave(hq // hkv, dim=1)
    score_err = d * 2.0**-24 * d**-0.5 * (q.double().abs() @ kk.transpose(-1, -2)).amax()  # the recursive-sum bound
    bound = (score_err + 2.0**-20) * (exact.abs() + v.double().abs().amax())
    assert bound.max() < 0.02  # still far below what a wrong key, scale or mask does
    for name, out in (("kernel", got), ("PyTorch's SDPA", sdpa)):
        err = (out.double() - exact).abs()
        assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@needs_avx512
@pytest.mark.parametrize("b,h,t,d", [(1, 12, 1024, 64), (1, 16, 729, 72), (2, 3, 33, 8), (1, 2, 2, 24), (3, 1, 17, 256),
                                     (1, 5, 144, 64), (1, 2, 9, 7)])
def test_f32_attention_is_sdpas_numbers(b, h, t, d):
    q, k, v = _qkv(b, h, t, d, seed=t + d)
    got = torch.ops.smolvlm.f32_attention(q, k, v, None, False)
    assert got.dtype == torch.float32 and got.shape == (b, t, h * d) and got.is_contiguous()
    _assert_within_bound(got, q, k, v, None)


@needs_avx512
@pytest.mark.parametrize("b,hq,hkv,t", [(1, 9, 3, 900), (2, 4, 2, 37), (1, 3, 1, 1), (1, 15, 5, 64)])
def test_f32_attention_causal_with_grouped_heads(b, hq, hkv, t):
    q, k, v = _qkv(b, hq, t, 64, seed=t, hkv=hkv)
    got = torch.ops.smolvlm.f32_attention(q, k, v, None, True)
    _assert_within_bound(got, q, k, v, None, causal=True)
    if t > 1:  # the first query sees only the first key: its output is v's first row, whatever follows
        first = got.view(b, t, hq, 64)[:, 0]
        assert torch.allclose(first, v[:, torch.arange(hq) // (hq // hkv), 0], rtol=1e-6, atol=1e-6)


@needs_avx512
@pytest.mark.parametrize("per_query", [False, True])
def test_f32_attention_hides_masked_keys(per_query):
    """A key mask (the vision encoder's padded patches) or a mask per query (a prompt over a cache prefix,
    a padded batch of prompts), with fewer queries than keys: SDPA's numbers; a row that sees nothing gives
    zeros; what a hidden key holds does not matter."""
    q, _, _ = _qkv(2, 6, 9, 32, seed=4)
    _, k, v = _qkv(2, 3, 50, 32, seed=5)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 9 if per_query else 1, 50, generator=g) < 0.7
    mask[..., 0] = True
    got = torch.ops.smolvlm.f32_attention(q, k, v, mask, False)
    _assert_within_bound(got, q, k, v, mask)
    v2 = v.clone()
    v2[~mask[:, :, 0].expand(2, 3, 50)] = 1e6  # hidden keys' values, as row 0 of each batch sees them
    if not per_query:
        assert torch.equal(torch.ops.smolvlm.f32_attention(q, k, v2, mask, False), got)
    hidden = mask.clone()
    hidden[0, 0, 0 if not per_query else 3] = False
    row = torch.ops.smolvlm.f32_attention(q, k, v, hidden, False).view(2, 9, -1)[0]
    assert (row == 0).all() if not per_query else (row[3] == 0).all()


@needs_avx512
def test_f32_attention_refuses_what_it_cannot_do():
    q, k, v = _qkv(1, 2, 10, 16, seed=0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.smolvlm.f32_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, False)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hkv"):
        torch.ops.smolvlm.f32_attention(q, k[:, :, :5], v, None, False)
    with pytest.raises(RuntimeError, match="causal needs as many keys"):
        torch.ops.smolvlm.f32_attention(q, k[:, :, :5], v[:, :, :5], None, True)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.smolvlm.f32_attention(q, k, v, torch.ones(1, 1, 3, 10, dtype=torch.bool), False)


def test_attention_takes_the_f32_kernel_where_it_is_ready(monkeypatch):
    """``layers.attention`` sends float32 whole-sequence calls (no mask, a key mask, a mask per query, causal
    over exactly their own keys; no gradient) to the kernel where ``kernels.ready("f32_attention")`` (AVX-512,
    MKL running AVX2 code: ``cpu.mkl_runs_avx512``); single queries, gradient-tracking calls, additive masks
    and bf16 keep their paths. Runs on every CPU: the kernel is stood in for by SDPA here."""
    from smolvlm.model import layers
    from tests.helpers import stand_in_attention_kernel

    calls = stand_in_attention_kernel(monkeypatch, "f32_attention", lambda q, c: (q.dtype, q.shape[2], c))
    q, k, v = _qkv(2, 4, 20, 16, seed=3)
    layers.attention(q, k, v, torch.ones(2, 1, 1, 20, dtype=torch.bool))
    layers.attention(q, k[:, :2], v[:, :2], None, is_causal=True)
    layers.attention(q[:, :, :5], k, v, torch.ones(1, 1, 5, 20, dtype=torch.bool))
    assert calls == [(torch.float32, 20, False), (torch.float32, 20, True), (torch.float32, 5, False)]
    layers.attention(q[:, :, :1], k, v, None)
    layers.attention(q.detach().requires_grad_(), k, v, None)
    layers.attention(q, k, v, torch.zeros(2, 1, 20, 20))  # an additive mask
    layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert len(calls) == 3
    monkeypatch.setattr(layers.kernels, "ready", lambda kind="gemv": False)
    layers.attention(q, k, v, None)
    assert len(calls) == 3


def test_f32_attention_is_ready_only_with_avx512_where_mkl_runs_avx2_code(monkeypatch):
    """Its readiness follows the CPU whatever this one is: AVX-512 and not an Intel CPU (whose MKL runs AVX-512
    inside PyTorch's flash attention, not measured against this kernel) with the kernels in use."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "build", lambda: None)
    for flags, vendor, want in (({"avx2", "fma", "avx512f"}, "AuthenticAMD", True),
                                ({"avx2", "fma", "avx512f"}, "GenuineIntel", False),
                                ({"avx2", "fma"}, "AuthenticAMD", False)):
        monkeypatch.setattr(cpu, "flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(cpu, "vendor", lambda vendor=vendor: vendor)
        kernels._state.clear()
        assert kernels.prepare() and kernels.ready("f32_attention") == want


@needs_avx512
def test_the_vision_encoder_gives_sdpas_features_with_the_kernel(monkeypatch):
    """A float32 vision tower (2 layers) on a padded image with and without the kernel: the same features
    at float32 tolerance."""
    from tests.helpers import vision_tower_with_and_without_kernel

    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "f32_attention", None)
    assert kernels.build() is None and kernels.ready("f32_attention")
    got, want = vision_tower_with_and_without_kernel(monkeypatch, "f32_attention", torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
