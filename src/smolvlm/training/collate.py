"""Pad encoded samples into one training batch.

Each sample is a dict of unbatched tensors (``data.encode_sample``):
``input_ids (T,)``, ``attention_mask (T,)``, ``labels (T,)``, optionally
``pixel_values (N, 3, H, W)`` and ``pixel_attention_mask (N, H, W)``.

Padding mirrors the reference processor (SPEC 2.8): text right-padded with the pad id
(``<|im_end|>`` = 2 for the SmolVLM tokenizers) and label -100; images padded to the batch's
largest tile count and size with **exact zeros** (the model drops all-zero images, SPEC 1.4)
and a zero pixel mask.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class CollateError(ValueError):
    """Samples that cannot be batched (truncation through an image, mismatched fields)."""


def _truncate(s: dict[str, torch.Tensor], max_length: int, image_token_id: int | None) -> dict[str, torch.Tensor]:
    ids = s["input_ids"]
    if ids.shape[0] <= max_length:
        return s
    if image_token_id is not None and bool((ids[max_length:] == image_token_id).any()):
        n_img = int((ids == image_token_id).sum())
        raise CollateError(
            f"sample of {ids.shape[0]} tokens ({n_img} image tokens) would be cut at max_length={max_length} "
            f"inside an image; raise max_length or use fewer/smaller images"
        )
    out = dict(s)
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = s[k][:max_length]
    return out


def _pad_1d(xs: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    T = max(x.shape[0] for x in xs)
    out = torch.full((len(xs), T), value, dtype=xs[0].dtype)  # (B, T)
    for i, x in enumerate(xs):
        if side == "right":
            out[i, : x.shape[0]] = x
        else:
            out[i, T - x.shape[0]:] = x
    return out


def _pad_images(samples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    pvs = [s.get("pixel_values") for s in samples]
    real = [p for p in pvs if p is not None and p.shape[0] > 0]
    N = max(p.shape[0] for p in real)
    C = real[0].shape[1]
    H = max(p.shape[2] for p in real)
    W = max(p.shape[3] for p in real)
    pv = torch.zeros(len(samples), N, C, H, W, dtype=real[0].dtype)  # (B, N, 3, H, W), zeros = padding
    pm = torch.zeros(len(samples), N, H, W, dtype=torch.long)  # (B, N, H, W)
    for i, s in enumerate(samples):
        p = s.get("pixel_values")
        if p is None or p.shape[0] == 0:
            continue
        n, _, h, w = p.shape
        pv[i, :n, :, :h, :w] = p
        m = s.get("pixel_attention_mask")
        pm[i, :n, :h, :w] = m.to(torch.long) if m is not None else 1
    return pv, pm


def collate(samples: list[dict[str, torch.Tensor]], pad_token_id: int, max_length: int | None = None,
            image_token_id: int | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Batch encoded samples: ``input_ids/attention_mask/labels (B, T)`` and, when any sample has
    images, ``pixel_values (B, N, 3, H, W)`` + ``pixel_attention_mask (B, N, H, W)``.

    ``max_length`` truncates the text on the right; cutting through image tokens is an error
    (the model needs every image's S tokens). Right padding is the training default (SPEC 3.5).
    """
    if not samples:
        raise CollateError("collate() got an empty list of samples")
    if padding_side not in ("right", "left"):
        raise CollateError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if max_length is not None:
        samples = [_truncate(s, max_length, image_token_id) for s in samples]
    batch = {
        "input_ids": _pad_1d([s["input_ids"] for s in samples], pad_token_id, padding_side),
        "attention_mask": _pad_1d([s["attention_mask"] for s in samples], 0, padding_side),
        "labels": _pad_1d([s["labels"] for s in samples], IGNORE_INDEX, padding_side),
    }
    if any(s.get("pixel_values") is not None and s["pixel_values"].shape[0] > 0 for s in samples):
        batch["pixel_values"], batch["pixel_attention_mask"] = _pad_images(samples)
    return batch
