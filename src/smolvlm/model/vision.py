"""SigLIP-style vision encoder with NaViT position handling (SPEC 1.3).

Mirrors transformers 5.23 ``SmolVLMVisionTransformer`` / ``Idefics3VisionTransformer``:
valid-padding patch conv, learned position table indexed by bucketed position ids (so a partial
patch grid is stretched over the full table), pre-LN encoder blocks with biased projections,
tanh-GELU MLP, final ``post_layernorm``. Padded patches are masked as *keys* only.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from smolvlm.config import VisionConfig
from smolvlm.model.layers import attention
from smolvlm.model.packed import fused_outputs, linear_add, linear_gelu_tanh


def patch_position_ids(patch_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Position ids (B, h*w) for a boolean patch mask (B, h, w) whose valid part is a top-left rectangle.

    Row ``i`` of an image with ``nb_h`` valid rows goes to bucket ``floor(i * n / nb_h)`` (SPEC
    1.3). We evaluate it exactly as transformers 5.x does, in float32 (``i * (1/nb)`` clamped
    to ``1 - 1e-6``, bucketized against ``arange(1/n, 1, 1/n)``): for some table sizes (n = 19,
    25, 29, 31, ...) float rounding makes that differ from the exact integer floor, and the
    reference wins. For the released n = 27 and n = 32 the two agree. Padded patches get id 0.
    """
    b, h, w = patch_mask.shape
    dev = patch_mask.device
    boundaries = torch.arange(1 / n, 1.0, 1 / n, device=dev)  # float32, n-1 (or n) boundaries
    nb_h = patch_mask[:, :, 0].sum(dim=1)  # (B,)
    nb_w = patch_mask[:, 0, :].sum(dim=1)  # (B,)
    frac_h = torch.arange(h, device=dev, dtype=torch.float32)[None] * (1.0 / nb_h)[:, None]  # (B, h)
    frac_w = torch.arange(w, device=dev, dtype=torch.float32)[None] * (1.0 / nb_w)[:, None]  # (B, w)
    rows = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    cols = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (rows[:, :, None] * n + cols[:, None, :]).reshape(b, h * w)  # (B, h*w)
    return torch.where(patch_mask.reshape(b, h * w), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    """Patch conv + learned position table (``SmolVLMVisionEmbeddings``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.n = cfg.patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, padding="valid")
        self.position_embedding = nn.Embedding(self.n * self.n, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # (B, D, h, w); valid conv drops remainder pixels
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
        return x + self.position_embedding(patch_position_ids(patch_mask, self.n))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        if d % cfg.num_attention_heads:
            raise ValueError(f"vision hidden_size {d} is not divisible by num_attention_heads {cfg.num_attention_heads}")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.qkv_proj: nn.Module | None = None  # q/k/v as one packed weight, set by packing (model/packed.py)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``out_proj(attn(x))``, plus ``residual`` when given (fused into out_proj when packed)."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = fused_outputs(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"), x)
        q, k, v = (y.view(shape).transpose(1, 2) for y in (q, k, v))  # (B, H, T, hd)
        out = attention(q, k, v, mask)
        return self.out_proj(out) if residual is None else linear_add(self.out_proj, out, residual)  # (B, T, D)


class VisionMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (``SmolVLMVisionMLP`` with ``gelu_pytorch_tanh``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"unsupported vision hidden_act {cfg.hidden_act!r}; SmolVLM uses gelu_pytorch_tanh")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``fc2(gelu(fc1(x)))``, plus ``residual`` when given; GELU and the add are fused into the
        linears when they are packed (``model/packed.py``)."""
        h = linear_gelu_tanh(self.fc1, x)
        return self.fc2(h) if residual is None else linear_add(self.fc2, h, residual)


class EncoderLayer(nn.Module):
    """Pre-LN block: ``x += attn(LN1(x)); x += mlp(LN2(x))``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn(self.layer_norm1(x), mask, residual=x)  # x + attn(LN1(x))
        return self.mlp(self.layer_norm2(x), residual=x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def key_padding_mask(patch_mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, 1, h*w) hiding padded patches as keys; None when nothing is padded.

    An image with no valid patch at all would give rows with no allowed key (NaN in SDPA); the
    reference's additive ``finfo.min`` mask makes such rows uniform over all keys, so we allow all.
    """
    flat = patch_mask.reshape(patch_mask.shape[0], -1)  # (B, h*w)
    if bool(flat.all()):
        return None
    flat = flat | ~flat.any(dim=1, keepdim=True)
    return flat[:, None, None, :]


class VisionTransformer(nn.Module):
    """``model.vision_model``: embeddings -> encoder -> post_layernorm. Input (B, 3, H, W)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        *_, out = self.layerwise(pixel_values, patch_mask)
        return out  # (B, h*w, D)

    def layerwise(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None
                  ) -> Iterator[torch.Tensor | None]:
        """``forward`` one encoder layer per ``next()``: the same modules in the same order, so the same
        numbers. Yields None after each layer but the last (the embeddings run with the first), then the
        output (B, h*w, D) (post_layernorm after the last layer). A caller can do other work between
        layers: the server runs its decode steps between a newcomer's (``generation/engine.py``)."""
        b, _, h, w = pixel_values.shape
        p = self.config.patch_size
        if patch_mask is None:
            patch_mask = torch.ones(b, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)  # (B, h*w, D)
        mask = key_padding_mask(patch_mask)
        layers = self.encoder.layers
        for i, layer in enumerate(layers):
            x = layer(x, mask)
            if i + 1 < len(layers):
                yield None
        yield self.post_layernorm(x)
