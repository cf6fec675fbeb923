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

    def get_or_encode(self, model: Any, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
                      ) -> torch.Tensor:
        """Every tile's features ``(n_real, S, D)``, the tiles not cached encoded in one call."""
        tiles = TileEncoding(self, model, pixel_values, pixel_attention_mask)
        tiles.encode()
        return tiles.features()


class TileEncoding:
    """One request's image tiles through a ``FeatureCache``, encodable a piece at a time: ``encode()``
    encodes the real tiles neither cached nor encoded yet in one encoder call, ``step()`` one encoder
    layer of one such tile; ``remaining`` counts the tiles not encoded yet
    and ``features()`` is ``model.get_image_features``'s output ``(n_real, S, D)`` once none is left.
    Tiles are independent (module docstring), so the features do not depend on how the tiles were
    split. The engine spreads an image's encoding over its steps while other requests decode, so they
    are not held up for the whole image (``engine.py``). The features encoded here are held until
    ``features()``, whatever the cache evicts meanwhile."""

    @torch.inference_mode()
    def __init__(self, cache: FeatureCache, model: Any, pixel_values: torch.Tensor,
                 pixel_attention_mask: torch.Tensor | None) -> None:
        cache._bind(model)
        self.cache, self.model = cache, model
        self.pixel_values, self.pixel_attention_mask = pixel_values, pixel_attention_mask
        dtype = next(model.parameters()).dtype
        B, N = pixel_values.shape[:2]
        self.tiles = pixel_values.reshape(B * N, *pixel_values.shape[2:])  # (B·N, 3, H, W)
        self.masks = (None if pixel_attention_mask is None
                      else pixel_attention_mask.reshape(B * N, *pixel_attention_mask.shape[2:]))
        real = (self.tiles.to(dtype) != 0).flatten(1).any(dim=1)  # (B·N,) padding tiles are exact zeros
        self.idx = real.nonzero().flatten().tolist()
        self.keys = [(str(dtype), _digest(self.tiles[i]), None if self.masks is None else _digest(self.masks[i]))
                     for i in self.idx]
        self.done: dict[int, torch.Tensor] = {}  # j (into idx/keys) -> that tile's features (S, D)
        self._running: tuple[int, Any] | None = None  # the tile ``step`` is in: (j, its feature steps)
        self._look_up()

    def _look_up(self) -> None:
        """Take the cached features of the tiles still to do (another request may have encoded them)."""
        for j, k in enumerate(self.keys):
            if j not in self.done and k in self.cache._entries:
                self.cache._entries.move_to_end(k)
                self.done[j] = self.cache._entries[k]
                self.cache.hits += 1

    @property
    def remaining(self) -> int:
        return len(self.keys) - len(self.done)

    @torch.inference_mode()
    def encode(self) -> None:
        """Every tile left, in one encoder call (a tile ``step`` began is finished first)."""
        while self._running is not None:
            self.step()
        self._look_up()
        todo = [j for j in range(len(self.keys)) if j not in self.done]
        if not todo:
            return
        sel = torch.tensor([self.idx[j] for j in todo], device=self.tiles.device)
        pm = None if self.masks is None else self.masks[sel][None]  # (1, n, H, W)
        feats = self.model.get_image_features(self.tiles[sel][None], pm)  # (n, S, D)
        self.cache.encoder_calls += 1
        for row, j in enumerate(todo):
            self._store(j, feats[row])

    def _store(self, j: int, feats: torch.Tensor) -> None:
        """Tile j's features (S, D): this request's, and a copy for the cache."""
        self.cache.misses += 1
        self.done[j] = feats
        self.cache._put(self.keys[j], feats.clone())

    @torch.inference_mode()
    def step(self) -> None:
        """One unit of encoding: one vision-encoder layer of the first tile neither cached nor encoded yet
        (``model.image_feature_steps``; its embeddings with the first layer, its connector with the last,
        after which the tile counts as encoded). The engine runs these between decode steps; a tile
        encodes to the same features as through ``encode``."""
        if self._running is None:
            self._look_up()
            j = next((j for j in range(len(self.keys)) if j not in self.done), None)
            if j is None:
                return
            i = self.idx[j]
            pm = None if self.masks is None else self.masks[i:i + 1][None]  # (1, 1, H, W)
            self._running = j, self.model.image_feature_steps(self.tiles[i:i + 1][None], pm)
            self.cache.encoder_calls += 1
        j, steps = self._running
        feats = next(steps)
        if feats is not None:
            self._running = None
            self._store(j, feats[0])

    @torch.inference_mode()
    def features(self) -> torch.Tensor:
        if not self.idx:  # no real tile: the model's own rule decides (varies by model_type); nothing to cache
            self.cache.encoder_calls += 1
            return self.model.get_image_features(self.pixel_values, self.pixel_attention_mask)
        if self.remaining:
            raise RuntimeError(f"{self.remaining} of the image tiles are not encoded yet")
        return torch.stack([self.done[j] for j in range(len(self.keys))])  # (n_real, S, D)
