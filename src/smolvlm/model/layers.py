"""Shared building blocks: RMSNorm, rotate-half RoPE, gated SiLU MLP, SDPA attention.

Numerics mirror transformers 5.23 ``models/llama/modeling_llama.py`` (SPEC 1.6): RMSNorm in
float32 with the weight multiplied *after* the cast back; RoPE frequencies and angles in float32,
cos/sin cast to the activation dtype; GQA repeats KV heads consecutively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.model.packed import fused_outputs


class RMSNorm(nn.Module):
    """Llama RMSNorm (``LlamaRMSNorm``): normalise in fp32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # The reference multiplies the weight in the activation dtype (after the cast back).
        return self.weight * h.to(dtype)


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


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, hd) and k (B, Hkv, T, hd) with cos/sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class GatedMLP(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))`` (``LlamaMLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # gate/up as one packed weight, set by packing (model/packed.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_outputs(self, "gate_up_proj", ("gate_proj", "up_proj"), x)
        return self.down_proj(F.silu(gate) * up)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


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
    if q.shape[2] == 1 and mask is None and q.dtype in _LOW_PRECISION and q.device.type == "cpu":
        # One-query decode in bf16/fp16: PyTorch's CPU SDPA kernel is ~5x slower in reduced
        # precision than in fp32 for T=1 (about 1 ms vs 0.18 ms per layer at L=950, cast included),
        # so attend in fp32 and round the (B, Hq, 1, hd) result back. More accurate, not less.
        # (``new_kv_cache`` keeps the cache in fp32 for such models, so k/v need no cast here.)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=gqa).to(q.dtype)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the KV cache is kept wider (fp32)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)  # (B, T, Hq*hd)
