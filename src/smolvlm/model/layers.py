"""Shared building blocks: RMSNorm, rotate-half RoPE, gated SiLU MLP, SDPA attention.

Numerics mirror transformers 5.23 ``models/llama/modeling_llama.py`` (SPEC 1.6): RMSNorm in
float32 with the weight multiplied *after* the cast back; RoPE frequencies and angles in float32,
cos/sin cast to the activation dtype; GQA repeats KV heads consecutively.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm import cpu, kernels
from smolvlm.model.packed import fused_outputs, linear_add


class RMSNorm(nn.Module):
    """Llama RMSNorm (``LlamaRMSNorm``): normalise in fp32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and kernels.ready("rms_norm")):
            # the same steps in one native call (kernels/rms_norm.cpp): ~3 us against ~11 for a 576-wide bf16 row
            return torch.ops.smolvlm.rms_norm(x, self.weight, self.eps)
        # ``F.rms_norm`` is the reference's ``h * rsqrt(mean(h^2) + eps)`` on the fp32 cast, as one
        # kernel instead of five (a decode step runs 61 of them). The reference multiplies the
        # weight in the activation dtype (after the cast back).
        h = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``1 / theta^(2k/head_dim)`` in float32, shape (head_dim/2,) (default RoPE, no scaling).

    Computed on the fly (it is tiny) so a model built on the meta device needs no buffer fix-up.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta ** exponent)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``position_ids`` (B, T) -> two (B, T, head_dim) tensors in ``dtype``.

    Angles are computed in float32 and the half-size frequency vector is concatenated twice
    (``[f, f]``), matching ``LlamaRotaryEmbedding.forward``.
    """
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.to(torch.float32)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on halves of the last dim (GPT-NeoX form, not interleaved)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, hd) cos/sin -> the (B, T, 1, hd) tables ``apply_rope`` takes: cos, and sin with its
    first half negated (``rotate_half(x) * sin == roll(x, hd/2) * signed_sin``, bit for bit)."""
    half = sin.shape[-1] // 2
    return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd), heads of q and k together if wanted, with ``rope_tables``' (B, T, 1, hd) tables.

    The reference's ``x * cos + rotate_half(x) * sin`` in four kernels instead of six:
    ``rotate_half(x) = [-x2, x1]`` is ``roll(x, hd/2) = [x2, x1]`` times the signs folded into ``signed_sin``.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class GatedMLP(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))`` (``LlamaMLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate/up as one packed weight, set by packing (model/packed.py)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))``, plus ``residual`` (one fused kernel when packed) if given."""
        gate, up = fused_outputs(self, "gate_up_proj", ("gate_proj", "up_proj"), x)
        h = F.silu(gate) * up
        return self.down_proj(h) if residual is None else linear_add(self.down_proj, h, residual)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_attends_fast_in(dtype: torch.dtype) -> bool:
    """Whether this CPU attends at least as fast in ``dtype`` as in fp32 (decides the KV cache dtype:
    ``SmolVLM.new_kv_cache``).

    bf16: with AMX (PyTorch's bf16 flash attention uses its tiles), or where smolvlm's decode attention
    kernel runs (any AVX2 CPU with a compiler). PyTorch's bf16 SDPA is slow only for one query: over
    900 keys x 3 KV heads, 2 threads, ~5x fp32's time on an AVX2-only EPYC (about 1 ms vs 0.18 ms
    per layer), 7.7x on a Zen 5 EPYC without AMX (384 vs 50 us); smolvlm's decode attention reads the
    bf16 cache in fp32's time (24 vs 26 us there). Prompts of more than one query attend as fast in
    bf16 as in fp32: smolvlm's bf16 attention kernel with AVX-512 BF16, else PyTorch's flash attention
    (Zen 5 run as an AVX2-only CPU, ``cpu.avx2_only_env``: a 900-token causal prompt 12.5 vs 12.1 ms
    a layer, 512 queries over 1024 keys with a mask 9.2 vs 9.0, 8 over 900 0.21 vs 0.20, a 512 px
    tile's 12 heads 19.4 vs 22.7; ANALYSIS, twenty-second round). fp16: never (no native fp16 SDPA
    path on these CPUs).
    """
    if dtype == torch.float32:
        return True
    if dtype != torch.bfloat16:
        return False
    return cpu.has("amx_tile") or kernels.ready("decode_attention")


def _decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           is_causal: bool) -> bool:
    """One query per row over an fp32 or bf16 cache (decode), no gradient: ``smolvlm.kernels``' decode
    attention, where this CPU runs it (AMX CPUs included: ``kernels.ON_AMX``). Its result is fp32 SDPA's over
    the cache's values (bf16 ones widened exactly), rounded once to q's dtype, like the branch below, in about 0.6x
    the time of PyTorch's flash-attention call over an fp32 cache (bench/ANALYSIS.md, eleventh round)."""
    return (q.shape[2] == 1 and not is_causal and k.dtype == v.dtype and k.dtype in (torch.float32, torch.bfloat16)
            and q.device.type == "cpu" and q.shape[-1] % 8 == 0 and (mask is None or mask.dtype == torch.bool)
            and not (q.requires_grad and torch.is_grad_enabled()) and kernels.ready("decode_attention"))


def _seq_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> Callable[..., torch.Tensor] | None:
    """smolvlm's attention of a whole sequence for this call, or None. Both kernels take more than one query
    of one dtype, D at most 256, a key mask, a mask per query or none, causal only over exactly their own
    keys, and no gradient; each runs where ``kernels.ready`` says so:
    - bf16 (D even; ``kernels/bf16_attention.cpp``, AVX-512 BF16 without AMX): the vision encoder's attention,
      with its key mask; a prompt's, causal over its own keys, or with a mask per query after a cache prefix
      or in a padded batch. The numbers of PyTorch's bf16 flash attention (fp32 scores and softmax, exps
      rounded to bf16 for the product with v) in a fraction of its time on a Zen 5 EPYC: one 512 px tile's
      12 heads 4.7 vs 17.2 ms, a 1141-token 256M prompt's layer 2.4 vs 11.7 ms (ANALYSIS, fifteenth round).
    - float32 (``kernels/f32_attention.cpp``, AVX-512 where MKL, which PyTorch's flash attention calls for its
      products, runs AVX2 code): fp32 SDPA's numbers; that tile 8.2 vs 17.7 ms on the Zen 5, a 900-token
      causal layer 2.5 vs 7.8 (ANALYSIS, twenty-second round)."""
    if not (q.dtype == k.dtype == v.dtype and q.shape[2] > 1 and q.device.type == "cpu"
            and q.shape[-1] <= 256 and k.shape == v.shape and k.shape[1] > 0
            and q.shape[1] % k.shape[1] == 0 and (not is_causal or (k.shape[2] == q.shape[2] and mask is None))
            and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] in (1, q.shape[2])))
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    if q.dtype == torch.bfloat16 and q.shape[-1] % 2 == 0 and kernels.ready("bf16_attention"):
        return torch.ops.smolvlm.bf16_attention
    if q.dtype == torch.float32 and kernels.ready("f32_attention"):
        return torch.ops.smolvlm.f32_attention
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention, scale ``head_dim^-0.5``.

    q: (B, Hq, T, hd); k, v: (B, Hkv, L, hd) with Hq a multiple of Hkv (query head h uses KV
    head ``h // (Hq/Hkv)``, like ``repeat_kv``); mask: boolean (B or 1, 1, T, L), True = may
    attend. Returns (B, T, Hq*hd).
    """
    gqa = q.shape[1] != k.shape[1]
    seq = _seq_kernel(q, k, v, mask, is_causal)
    if seq is not None:
        return seq(q, k, v, mask, is_causal)  # (B, T, Hq*hd) already
    if _decode_kernel_applies(q, k, v, mask, is_causal):
        out = torch.ops.smolvlm.decode_attention(q, k, v, mask)  # fp32 SDPA's numbers, ~0.6x its time
    elif q.dtype in _LOW_PRECISION and k.dtype == torch.float32:
        # An fp32 cache (``new_kv_cache`` keeps one for fp16 models, and for bf16 ones where no decode
        # kernel runs: ``cpu_attends_fast_in``): attend in fp32 and round the result back, rather than
        # cast the whole cache down every call. With a mask too: the compiled decode step's static
        # cache, per-row decode, chunked prefill (AVX2 EPYC, 256M, 900 keys: 0.89 ms a layer in
        # bf16 with the cast, about 0.2 in fp32).
        out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=gqa).to(q.dtype)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache and q differ in dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)  # (B, T, Hq*hd)
