"""smolvlm's bf16 attention kernel for whole sequences (``kernels/bf16_attention.cpp``: the vision
encoder's SDPA and a prompt's causal one, on AVX-512 BF16 CPUs without AMX) and ``layers.attention``'s
choice of it.

Tolerance. The kernel computes what PyTorch's bf16 flash attention computes: q.k summed in float32
from exact bf16 products, the softmax in float32, each exp(s - max) rounded to bf16 (relative error
<= 2^-9) before its product with v, the float32 sum of the unrounded exps as divisor, the result
rounded once to bf16 (<= 2^-9 relative). Against float64 attention of the same bf16 inputs the exps'
rounding moves the output by at most 2^-9 * sum_j p_j |v_j| <= 2^-9 max|v|, the output rounding by
2^-9 |out|; float32 summation and the exp polynomial (~2 ulp) add far less. So
|got - exact| <= 2^-9 (|exact| + max|v|) + 1e-6; a dropped key, a wrong scale or a mask ignored
moves outputs by O(0.1-1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smolvlm import cpu, kernels

BF16 = cpu.has("avx512_bf16") and kernels._cpu_problem() is None
needs_bf16 = pytest.mark.skipif(not BF16, reason="the bf16 attention kernel needs a CPU with AVX-512 BF16 "
                                f"({kernels._cpu_problem() or 'this one lacks it'}); layers.attention uses SDPA here")


def _qkv(b: int, h: int, t: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as the vision encoder passes them: head views of one fused (B, T, 3, H, D) projection
    (strided, last dim contiguous), values of O(1-3)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, t, 3, h, d, generator=g) * 2).to(torch.bfloat16)
    return tuple(x[:, :, i].transpose(1, 2) for i in range(3))


def _assert_within_bound(got: torch.Tensor, q, k, v, mask, causal: bool = False) -> None:
    b, h, t, d = q.shape
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal,
                                           enable_gqa=True)
    exact = exact.transpose(1, 2).reshape(b, t, h * d)
    bound = 2.0**-9 * (exact.abs() + v.double().abs().amax()) + 1e-6
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@needs_bf16
@pytest.mark.parametrize("b,h,t,d", [(1, 12, 1024, 64), (1, 16, 729, 72), (2, 3, 33, 8), (1, 2, 2, 24), (3, 1, 17, 256)])
def test_bf16_attention_is_flash_attentions_numbers(b, h, t, d):
    """The real vision shapes (256M/500M: 1024 patches, D 64; 2.2B: 729, D 72, an odd count) and
    small odd ones: within the bound above of exact attention, and as close to PyTorch's bf16 SDPA
    (which rounds the same way) as two roundings allow; output (B, T, H*D) contiguous."""
    assert kernels.build() is None
    q, k, v = _qkv(b, h, t, d, seed=t)
    got = torch.ops.smolvlm.bf16_attention(q, k, v, None, False)
    assert got.shape == (b, t, h * d) and got.dtype == torch.bfloat16 and got.is_contiguous()
    _assert_within_bound(got, q, k, v, None)
    theirs = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h * d)
    torch.testing.assert_close(got.float(), theirs.float(), rtol=2.0**-7, atol=2.0**-7 * v.float().abs().max().item())


@needs_bf16
@pytest.mark.parametrize("mask_rows", [1, "B"])
def test_bf16_attention_hides_masked_keys(mask_rows):
    """A key padding mask (1 or B, 1, 1, T) as the vision encoder builds for padded patches: masked
    keys change nothing (their values are set to garbage here); a row with no visible key gives zeros."""
    assert kernels.build() is None
    q, k, v = _qkv(3, 4, 100, 64, seed=7)
    mask = torch.ones(3 if mask_rows == "B" else 1, 1, 1, 100, dtype=torch.bool)
    mask[0, ..., 60:] = False
    if mask_rows == "B":
        mask[1, ..., 3:7] = False
        mask[2] = False
    got = torch.ops.smolvlm.bf16_attention(q, k, v, mask, False)
    if mask_rows == "B":
        assert (got[2] == 0).all()
        got, q, k, v, mask = got[:2], q[:2], k[:2], v[:2], mask[:2]
    _assert_within_bound(got, q, k, v, mask)
    v2 = v.clone()
    v2[0, :, 60:] = 1e4
    assert torch.equal(torch.ops.smolvlm.bf16_attention(q, k, v2, mask, False), got)


@needs_bf16
def test_a_nan_shows_in_the_output():
    """A NaN key spoils every row of its head (each row's softmax sees it), a NaN value the channel it
    sits in, as SDPA does: never hidden."""
    assert kernels.build() is None
    q, k, v = _qkv(1, 2, 40, 16, seed=1)
    k, v = k.clone(), v.clone()
    k[0, 0, 5, 3] = float("nan")
    got = torch.ops.smolvlm.bf16_attention(q, k, v, None, False).view(1, 40, 2, 16)
    assert got[0, :, 0].isnan().all() and not got[0, :, 1].isnan().any()
    k[0, 0, 5, 3], v[0, 1, 7, 2] = 0.0, float("nan")
    got = torch.ops.smolvlm.bf16_attention(q, k, v, None, False).view(1, 40, 2, 16)
    assert got[0, :, 1, 2].isnan().all() and got[0, :, 1].isnan().sum() == 40 and not got[0, :, 0].isnan().any()


@needs_bf16
def test_bf16_attention_refuses_what_it_cannot_do():
    assert kernels.build() is None
    q, k, v = _qkv(1, 2, 10, 8, seed=0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.smolvlm.bf16_attention(q.float(), k.float(), v.float(), None, False)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hkv"):
        torch.ops.smolvlm.bf16_attention(q, k[:, :, :5], v, None, False)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hkv"):
        torch.ops.smolvlm.bf16_attention(q[:, :1], k, v, None, False)
    with pytest.raises(RuntimeError, match="causal needs as many keys"):
        torch.ops.smolvlm.bf16_attention(q, k[:, :, :5], v[:, :, :5], None, True)
    with pytest.raises(RuntimeError, match="D even"):
        torch.ops.smolvlm.bf16_attention(q[..., :7], k[..., :7], v[..., :7], None, False)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.smolvlm.bf16_attention(q, k, v, torch.ones(1, 1, 3, 10, dtype=torch.bool), False)


@needs_bf16
@pytest.mark.parametrize("b,hq,hkv,t", [(1, 9, 3, 1141), (2, 4, 2, 77), (1, 2, 2, 5), (1, 15, 5, 40)])
def test_bf16_attention_causal_with_grouped_heads(b, hq, hkv, t):
    """A prompt's attention: causal (query i sees keys 0..i), query head h reading KV head
    h // (Hq / Hkv); SmolLM2-135M's 9 over 3 heads at a 1141-token image prompt, 360M's 15 over 5, and
    lengths that end inside a block of 8 queries and of 32 keys. Same bound as above."""
    assert kernels.build() is None
    g = torch.Generator().manual_seed(t)
    q = (torch.randn(b, t, hq, 64, generator=g) * 2).to(torch.bfloat16).transpose(1, 2)
    k, v = ((torch.randn(b, t, hkv, 64, generator=g) * 2).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    got = torch.ops.smolvlm.bf16_attention(q, k, v, None, True)
    assert got.shape == (b, t, hq * 64)
    _assert_within_bound(got, q, k, v, None, causal=True)
    first = torch.ops.smolvlm.bf16_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, True)
    assert torch.equal(first[0, 0].view(hq, 64), v[0, torch.arange(hq) // (hq // hkv), 0])  # sees itself only


@needs_bf16
@pytest.mark.parametrize("case", ["prefix", "padded batch", "odd"])
def test_bf16_attention_with_a_mask_per_query(case):
    """A (B or 1, 1, T, L) mask, as ``text.build_mask`` makes them: a prompt written after a cache
    prefix (query i sees keys up to its slot), a left-padded batch of prompts (each row its own
    padding), and odd lengths with a mask strided as a slice. Same bound as above; a row whose
    mask hides everything gives zeros."""
    from smolvlm.model.text import build_mask

    assert kernels.build() is None
    if case == "prefix":
        q, _, _ = _qkv(1, 9, 300, 64, seed=6)
        _, k, v = _qkv(1, 3, 413, 64, seed=7)
        mask = build_mask(torch.arange(113, 413), 413, None)
    elif case == "padded batch":
        q, _, _ = _qkv(2, 4, 77, 64, seed=8)
        _, k, v = _qkv(2, 2, 77, 64, seed=9)
        valid = torch.ones(2, 77, dtype=torch.long)
        valid[1, :20] = 0
        mask = build_mask(torch.arange(77), 77, valid)
    else:
        q, _, _ = _qkv(1, 2, 19, 24, seed=10)
        _, k, v = _qkv(1, 1, 45, 24, seed=11)
        mask = (torch.rand(1, 1, 19, 60, generator=torch.Generator().manual_seed(1)) < 0.5)[..., :45]
        mask[..., 0] = True
    assert mask.shape[2] == q.shape[2]
    got = torch.ops.smolvlm.bf16_attention(q, k, v, mask, False)
    _assert_within_bound(got, q, k, v, mask)
    hidden = mask.clone()
    hidden[0, 0, 3] = False
    assert (torch.ops.smolvlm.bf16_attention(q, k, v, hidden, False).view(*got.shape[:2], -1)[0, 3] == 0).all()


@needs_bf16
def test_bf16_attention_with_fewer_queries_than_keys():
    """Not causal, T queries over L != T keys (a key mask allowed): attention as SDPA computes it."""
    assert kernels.build() is None
    q, _, _ = _qkv(2, 6, 9, 32, seed=4)
    _, k, v = _qkv(2, 3, 50, 32, seed=5)
    mask = torch.rand(2, 1, 1, 50, generator=torch.Generator().manual_seed(0)) < 0.7
    mask[..., 0] = True
    _assert_within_bound(torch.ops.smolvlm.bf16_attention(q, k, v, mask, False), q, k, v, mask)


def test_attention_takes_the_bf16_kernel_for_bidirectional_bf16_self_attention_only(monkeypatch):
    """``layers.attention`` sends bf16 q/k/v with no mask or a key mask, or causal over exactly their
    own keys, or with a mask per query (a cache prefix, a padded batch), grouped heads or not, and no
    gradient to the kernel where ``kernels.ready("bf16_attention")`` (AVX-512 BF16, no AMX); causal
    over more keys, causal with a mask, float32, additive masks, single-query or gradient-tracking calls
    keep SDPA. Runs
    on every CPU: the kernel is stood in for by SDPA here, its numbers are the tests above."""
    from smolvlm.model import layers
    from tests.helpers import stand_in_attention_kernel

    calls = stand_in_attention_kernel(monkeypatch, "bf16_attention", lambda q, c: (q.shape, c))
    q, k, v = _qkv(2, 4, 20, 16, seed=3)
    key_mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    out = layers.attention(q, k, v, key_mask)
    assert calls == [((2, 4, 20, 16), False)] and out.shape == (2, 20, 64)
    layers.attention(q, k, v, None)
    layers.attention(q, k, v, None, is_causal=True)
    layers.attention(q, k[:, :2], v[:, :2], None, is_causal=True)  # grouped heads
    assert calls[1:] == [((2, 4, 20, 16), False), ((2, 4, 20, 16), True), ((2, 4, 20, 16), True)]
    layers.attention(q[:, :, :5], k, v, None, is_causal=True)  # a cache prefix: SDPA's top-left causal
    layers.attention(q, k, v, key_mask, is_causal=True)
    layers.attention(q.float(), k.float(), v.float(), None)
    layers.attention(q, k, v, torch.zeros(2, 1, 20, 20, dtype=torch.bfloat16))  # an additive mask
    layers.attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], None)
    layers.attention(q.detach().requires_grad_(), k, v, None)
    assert len(calls) == 4
    layers.attention(q, k, v, torch.ones(2, 1, 20, 20, dtype=torch.bool))  # a mask per query
    layers.attention(q[:, :, :5], k, v, torch.ones(1, 1, 5, 20, dtype=torch.bool))  # after a cache prefix
    assert calls[4:] == [((2, 4, 20, 16), False), ((2, 4, 5, 16), False)]
    monkeypatch.setattr(layers.kernels, "ready", lambda kind="gemv": False)
    layers.attention(q, k, v, key_mask)
    assert len(calls) == 6


@needs_bf16
def test_the_vision_encoder_gives_sdpas_features_with_the_kernel(monkeypatch):
    """A bf16 vision tower (2 layers, D 16 heads) with and without the kernel, on a padded image: the
    same features up to the two roundings per layer (bf16 outputs of O(1): 2^-6 relative). Forced on: AMX CPUs
    keep PyTorch's attention for images by default (``kernels.ON_AMX``)."""
    from tests.helpers import vision_tower_with_and_without_kernel

    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "bf16_attention", None)
    assert kernels.build() is None and kernels.ready("bf16_attention")
    got, want = vision_tower_with_and_without_kernel(monkeypatch, "bf16_attention", torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-6, atol=2.0**-6)
