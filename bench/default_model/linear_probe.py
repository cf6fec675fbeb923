"""Shared by the probe scripts here: image features of a model and a linear classifier on them."""

from __future__ import annotations

from typing import Any

import torch


def image_features(model: Any, proc: Any, images: list[Any], batch: int = 16) -> torch.Tensor:
    """Connector output (the vectors the language model sees) per image: (n, tokens, D), float32."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            pv = torch.cat([proc(text=["<image>"], images=[[im]])["pixel_values"] for im in images[i:i + batch]], 0)
            out.append(model.get_image_features(pv).float())
    return torch.cat(out)


def linear_probe(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, ncls: int) -> float:
    """Held-out accuracy of a softmax classifier (standardised inputs, L2 1e-3, 300 Adam steps)."""
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(ftr.shape[1], ncls, requires_grad=True)
    b = torch.zeros(ncls, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ftr @ w + b, ytr) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    return ((fte @ w + b).argmax(1) == yte).float().mean().item()
