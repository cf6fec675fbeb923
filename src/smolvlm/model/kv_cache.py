"""Static, preallocated key/value cache (gpt-fast style).

One (B, n_kv_heads, max_len, head_dim) buffer pair per decoder layer. Callers write the keys and
values of the tokens at absolute slots ``input_pos``: either (T,), the same slots for every row,
or (B, T), each row its own slots (continuous batching: rows hold requests at different
positions). The text model then attends over the first L slots with a mask (see
``text.build_mask``). ``rows(start, stop)`` is a view of some rows whose buffers alias these
ones, so a request can be prefilled straight into its row of a shared cache.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer K/V buffers. Zero-initialised so unused slots are never NaN."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache of rows ``start..stop-1`` whose buffers are views of these (no copy): writes go to this cache.

        Slicing dim 0 of a contiguous (B, H, S, hd) buffer keeps it contiguous, so the view is as
        fast as a cache of its own size.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows({start}, {stop}) is outside this cache's {self.batch_size} rows")
        if start == 0 and stop == self.batch_size:
            return self
        view = object.__new__(KVCache)
        view.batch_size, view.max_len = stop - start, self.max_len
        view.n_kv_heads, view.head_dim = self.n_kv_heads, self.head_dim
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def __len__(self) -> int:
        return len(self.k)

    def check_positions(self, input_pos: torch.Tensor) -> None:
        """Raise a clear error for slots outside [0, max_len). Skipped under torch.compile (it syncs)."""
        if torch.compiler.is_compiling() or input_pos.numel() == 0:
            return
        lo, hi = int(input_pos.min()), int(input_pos.max())
        if lo < 0 or hi >= self.max_len:
            raise ValueError(
                f"KV cache overflow: writing slots {lo}..{hi} but the cache holds max_len={self.max_len} "
                f"positions; allocate a larger cache (new_kv_cache(batch_size, max_len=...))"
            )

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, hd) at slots ``input_pos`` (T,) or, per row, (B, T); return this layer's
        full (k, v) buffers. ``start``: the caller knows ``input_pos`` is ``start .. start+T-1``, so
        each buffer takes one slice copy (with the dtype cast) instead of a cast and an index copy."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch size {self.batch_size}, got a batch of {k.shape[0]}")
        if k.shape[2] != input_pos.shape[-1] or (input_pos.dim() == 2 and input_pos.shape[0] != k.shape[0]):
            raise ValueError(f"input_pos of shape {tuple(input_pos.shape)} does not fit {k.shape[0]} rows x "
                             f"{k.shape[2]} new tokens; pass (T,) or (B, T)")
        if layer_idx == 0:
            self.check_positions(input_pos)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if input_pos.dim() == 1 and start is not None:
            kc[:, :, start:start + k.shape[2]].copy_(k)
            vc[:, :, start:start + v.shape[2]].copy_(v)
            return kc, vc
        if input_pos.dim() == 1:
            kc.index_copy_(2, input_pos, k.to(kc.dtype))
            vc.index_copy_(2, input_pos, v.to(vc.dtype))
            return kc, vc
        # Per row: kc[b, :, input_pos[b, t]] = k[b, :, t]. The advanced indices (B, T) come first in
        # the indexed shape, so the values are given as (B, T, H, hd).
        rows = torch.arange(k.shape[0], device=kc.device)[:, None]  # (B, 1)
        kc[rows, :, input_pos] = k.transpose(1, 2).to(kc.dtype)  # (B, T, H, hd)
        vc[rows, :, input_pos] = v.transpose(1, 2).to(vc.dtype)
        return kc, vc

    def reset(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()
