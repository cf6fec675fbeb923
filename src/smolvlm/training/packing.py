"""Sequence packing (``data.packing: true``): several encoded samples share one row of at most
``max_length`` tokens, each attending only to itself.

The model side is ``SmolVLM.forward(segment_ids=...)`` (``model/text.py:segment_mask``): a token sees
only earlier tokens of its own sample, and RoPE positions restart at 0 for each sample, so a packed
sample computes what it computes alone (up to float summation order). Here:

* ``plan_packing``: first-fit in data order (each sample goes to the first row with room; a sample
  longer than ``max_length`` gets a row of its own);
* ``pack_collate``: the rows as a batch. ``segment_ids`` (1, 2, ... per row, 0 = padding) and
  ``position_ids`` (offset inside the sample) come with the usual ``input_ids / attention_mask /
  labels``. The label at each sample's first position is -100: the loss shifts labels by one, so
  that label would otherwise be the target of the previous sample's last token. Alone, a sample's
  first label is never a target either, so the targets (and ``LMLoss``'s weight, the number of
  target tokens) are exactly those of the samples unpacked. A row's ``pixel_values`` are its
  samples' images concatenated in order: the model scatters image features into ``<image>`` tokens
  in (row, position) order, which is the same order.

Packing happens within each micro-batch (the ``batch_size`` samples ``sft.train`` hands the collate
function), so the data order, the number of samples per step and an exact resume are unchanged; only
the number of rows (and the padding) shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smolvlm.training.collate import IGNORE_INDEX, CollateError, _pad_1d, _pad_images, _truncate
from smolvlm.training.recipe import Recipe, RecipeError


def plan_packing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of sample indices: first-fit in data order. Sample i goes to the first row whose
    remaining room is >= ``lengths[i]``, else opens a new row; a sample longer than ``max_length``
    opens a row that nothing else joins. Rows keep their samples in data order."""
    if max_length < 1:
        raise CollateError(f"packing needs max_length >= 1, got {max_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r in range(len(rows)):
            if n <= room[r]:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)  # negative for an over-long sample: nothing fits next to it
    return rows


def _row_images(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The row's images in sample order: (N, 3, H, W) + pixel mask (N, H, W), tiles of different
    sizes zero-padded to the largest (mask 0 there), as ``collate`` pads across samples."""
    with_images = [s for s in samples if s.get("pixel_values") is not None and s["pixel_values"].shape[0] > 0]
    if not with_images:
        return {}
    pvs = [s["pixel_values"] for s in with_images]
    h, w = max(p.shape[2] for p in pvs), max(p.shape[3] for p in pvs)
    pv_out, pm_out = [], []
    for s, p in zip(with_images, pvs):
        n, c, ph, pw = p.shape
        pv = torch.zeros(n, c, h, w, dtype=p.dtype)
        pv[:, :, :ph, :pw] = p
        pm = torch.zeros(n, h, w, dtype=torch.long)
        m = s.get("pixel_attention_mask")
        pm[:, :ph, :pw] = m.to(torch.long) if m is not None else 1
        pv_out.append(pv)
        pm_out.append(pm)
    return {"pixel_values": torch.cat(pv_out), "pixel_attention_mask": torch.cat(pm_out)}


def pack_row(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Encoded samples -> one unbatched packed row (``segment_ids`` 1..k, positions restarting at 0,
    each sample's first label -100, images concatenated)."""
    labels = []
    for s in samples:
        lab = s["labels"].clone()
        lab[:1] = IGNORE_INDEX  # never a target: the previous sample's last token would predict it
        labels.append(lab)
    row = {
        "input_ids": torch.cat([s["input_ids"] for s in samples]),
        "attention_mask": torch.cat([s["attention_mask"] for s in samples]),
        "labels": torch.cat(labels),
        "segment_ids": torch.cat([torch.full_like(s["input_ids"], k + 1) for k, s in enumerate(samples)]),
        "position_ids": torch.cat([torch.arange(s["input_ids"].shape[0]) for s in samples]),
    }
    row.update(_row_images(samples))
    return row


def pack_collate(samples: list[dict[str, torch.Tensor]], pad_token_id: int, max_length: int | None = None,
                 image_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Pack encoded samples (``data.encode_sample``) into rows of at most ``max_length`` tokens and
    batch them: ``input_ids / attention_mask / labels / segment_ids / position_ids (R, T)`` right-padded
    to the longest row (pad id / 0 / -100 / 0 / 0) and, when any sample has images, ``pixel_values
    (R, N, 3, H, W)`` + ``pixel_attention_mask (R, N, H, W)``. Samples longer than ``max_length`` are
    truncated first, as ``collate`` does (an error through an image)."""
    if not samples:
        raise CollateError("pack_collate() got an empty list of samples")
    if max_length is None:
        raise CollateError("sequence packing needs max_length (the row length)")
    samples = [_truncate(s, max_length, image_token_id) for s in samples]
    plan = plan_packing([s["input_ids"].shape[0] for s in samples], max_length)
    rows = [pack_row([samples[i] for i in idx]) for idx in plan]
    batch = {
        "input_ids": _pad_1d([r["input_ids"] for r in rows], pad_token_id, "right"),
        "attention_mask": _pad_1d([r["attention_mask"] for r in rows], 0, "right"),
        "labels": _pad_1d([r["labels"] for r in rows], IGNORE_INDEX, "right"),
        "segment_ids": _pad_1d([r["segment_ids"] for r in rows], 0, "right"),
        "position_ids": _pad_1d([r["position_ids"] for r in rows], 0, "right"),
    }
    if any("pixel_values" in r for r in rows):
        batch["pixel_values"], batch["pixel_attention_mask"] = _pad_images(rows)
    return batch


def check_recipe(recipe: Recipe) -> None:
    """``data.packing`` needs ``data.max_length`` (the packed row length) and the SFT objective."""
    if not recipe.data.packing:
        return
    if recipe.data.max_length is None:
        raise RecipeError("data.packing: true needs data.max_length (the length of a packed row)")
    if recipe.train.objective != "sft":
        raise RecipeError(f"data.packing is for train.objective: sft, not {recipe.train.objective!r}")
