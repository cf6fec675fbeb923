"""LRU cache of encoded image tiles, so asking again about the same image skips the vision encoder.

Granularity is one tile (one of the ``N`` arrays of a sample): the SigLIP encoder and the
connector treat tiles independently (SPEC 1.3-1.5), so a tile's features do not depend on the
other tiles in the batch, and a chat that re-sends earlier images with every turn hits the
cache for all of them. The key is a BLAKE2 digest of the tile's pixel bytes and pixel mask
bytes, plus their dtypes/shapes and the model's dtype; entries belong to one model instance.
Padding tiles (all exactly zero after the cast to the model dtype, SPEC 1.4) are dropped the
same way ``get_image_features`` drops them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any

import torch

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def _digest(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.digest()


class FeatureCache:
    """Bounded (in bytes) LRU map: tile digest -> features ``(S, D)`` for one model.

    ``get_or_encode(model, pixel_values (B,N,3,H,W), pixel_attention_mask (B,N,H,W)|None)``
    returns ``(n_real, S, D)`` exactly like ``model.get_image_features``, encoding only the
    tiles it has not seen. ``hits``/``misses`` count tiles; ``encoder_calls`` counts calls
    into the model's encoder.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._model_ref: weakref.ref | None = None
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.encoder_calls = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _bind(self, model: Any) -> None:
        # Features from another model (or a model that was garbage-collected) must never be reused.
        if self._model_ref is None or self._model_ref() is not model:
            self.clear()
            self._model_ref = weakref.ref(model)

    def _put(self, key: tuple[Any, ...], feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = feats
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    @torch.inference_mode()
    def get_or_encode(self, model: Any, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        self._bind(model)
        dtype = next(model.parameters()).dtype
        B, N = pixel_values.shape[:2]
        tiles = pixel_values.reshape(B * N, *pixel_values.shape[2:])  # (B·N, 3, H, W)
        masks = None if pixel_attention_mask is None else pixel_attention_mask.reshape(B * N, *pixel_attention_mask.shape[2:])
        real = (tiles.to(dtype) != 0).flatten(1).any(dim=1)  # (B·N,) padding tiles are exact zeros
        idx = real.nonzero().flatten().tolist()
        if not idx:  # no real tile: the model's own rule decides (varies by model_type); nothing to cache
            self.encoder_calls += 1
            return model.get_image_features(pixel_values, pixel_attention_mask)
        keys = [(str(dtype), _digest(tiles[i]), None if masks is None else _digest(masks[i])) for i in idx]
        missing = [j for j, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            sel = torch.tensor([idx[j] for j in missing], device=tiles.device)
            pv = tiles[sel][None]  # (1, n_missing, 3, H, W)
            pm = None if masks is None else masks[sel][None]  # (1, n_missing, H, W)
            feats = model.get_image_features(pv, pm)  # (n_missing, S, D)
            self.encoder_calls += 1
            for row, j in enumerate(missing):
                fresh[j] = feats[row]
        out = []
        for j, k in enumerate(keys):
            if j in fresh:
                out.append(fresh[j])
                self._put(k, fresh[j].clone())
            else:
                self._entries.move_to_end(k)
                out.append(self._entries[k])
        return torch.stack(out)  # (n_real, S, D)
