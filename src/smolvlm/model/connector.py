"""Connector: pixel shuffle + one bias-free linear layer (SPEC 1.5, ``SmolVLMConnector``)."""

from __future__ import annotations

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, n*n, D) -> (B, (n/s)^2, s*s*D).

    Output token (I, J) (row-major over the n/s x n/s grid) concatenates the inputs at grid
    positions (I*s + a, J*s + b), a outer, b inner: channel ``a*s*D + b*D + e``. This is the
    same permutation transformers builds from two view/permute steps.
    """
    b, seq, d = x.shape
    n = int(round(seq**0.5))
    if n * n != seq or n % s:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by scale {s}; got {seq} tokens")
    m = n // s
    x = x.reshape(b, m, s, m, s, d)  # (B, I, a, J, b, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, I, J, a, b, D)
    return x.reshape(b, m * m, s * s * d)  # (B, (n/s)^2, s^2*D)


class ModalityProjection(nn.Module):
    """``modality_projection``: a single ``proj`` Linear(D*s^2 -> hidden_text), no bias, no activation
    (transformers calls this class ``SimpleMLP``; it is one linear layer, and the checkpoint keys
    only see the attribute names)."""

    def __init__(self, cfg: SmolVLMConfig) -> None:
        super().__init__()
        in_dim = cfg.vision_config.hidden_size * cfg.scale_factor**2
        self.proj = nn.Linear(in_dim, cfg.text_config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Connector(nn.Module):
    def __init__(self, cfg: SmolVLMConfig) -> None:
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.modality_projection = ModalityProjection(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(x, self.scale_factor))  # (B, S, hidden_text)
