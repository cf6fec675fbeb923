"""Hand memory freed inside the process back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

glibc keeps freed blocks of a few MiB in its heap for reuse. Two places pay for that:
- the loader's per-layer loop (read a float layer, quantize or pack it, free it) grows the RSS by
  about a float layer per layer (+60 MiB a layer at 60 MiB layers, 4 layers -> +400 MiB for an
  86 MiB model);
- a prefill's temporaries (an image's tiles, a long prompt's activations, int4 weights
  dequantized for a GEMM) stay in the heap through the decode that follows and the next request:
  500M bf16, a 900-token prompt then two images, RSS 1493 MiB after against 1355 trimmed.
Letting glibc return large blocks by itself (``MALLOC_TRIM_THRESHOLD_``, which also turns every
large allocation into an ``mmap``) costs page faults on every prefill: 512x512 image time to
first token 6.8-7.4 s against 4.3-4.5 s (Xeon, 2 cores). One trim after each prefill costs
2-16 ms.

Lookup tables (``register_lookup_table``: the token embedding, which the loader leaves in the
checkpoint's file mapping) are the other leftover. A prompt reads a few rows, but each page fault
maps the file's cached pages around the row too (the kernel's fault-around, whole large folios on
ext4): a 900-token prompt of random ids left 36 MiB of SmolVLM-500M's 90 MiB table resident, next
to 968 MiB of weights. ``release_freed_memory`` also unmaps those pages; they stay in the page
cache, so the next lookups map them back without reading the disk.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref
from typing import Any, Callable

import numpy as np


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Return the heap's free blocks to the OS (``malloc_trim(0)``), where the C library can, and
    unmap the file pages the registered lookup tables' reads mapped (``release_lookup_pages``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    release_lookup_pages()


_TABLES: list[weakref.ref] = []
_MADV_DONTNEED = 4  # Linux
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/self/pagemap entry bits


def register_lookup_table(table: Any) -> None:
    """Let ``release_freed_memory`` unmap the file pages of ``table`` (a tensor read a few rows at a
    time, held in a file mapping) after each use; held weakly."""
    _TABLES[:] = [r for r in _TABLES if r() is not None and r() is not table]
    _TABLES.append(weakref.ref(table))


def release_lookup_pages() -> int:
    """``drop_file_pages`` for every registered lookup table; returns the bytes unmapped."""
    return sum(drop_file_pages(t) for t in (r() for r in _TABLES) if t is not None)


@functools.lru_cache(maxsize=None)
def _madvise() -> Callable[..., int] | None:
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f if os.path.exists("/proc/self/pagemap") else None


def drop_file_pages(t: Any) -> int:
    """Unmap the whole pages of tensor ``t``'s bytes that hold nothing but what a page fault would map
    again: file pages (clean ones in a private mapping, any in a shared one) and pages never touched.
    Pages this process wrote in a private mapping (copy-on-write: anonymous) or that are swapped
    are kept, so no data can be lost. ``t`` reads the same afterwards; its pages are mapped back as
    it is read (from the page cache). Returns the bytes of the pages left unmapped (0 where Linux's
    ``/proc/self/pagemap`` or ``madvise`` is missing)."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return 0
    n = (end - start) // page
    with open("/proc/self/pagemap", "rb") as f:
        entries = np.frombuffer(os.pread(f.fileno(), n * 8, start // page * 8), dtype=np.uint64)
    if len(entries) != n:
        return 0
    kept = ((entries & np.uint64(_PRESENT)) != 0) & ((entries & np.uint64(_FILE)) == 0)
    kept |= (entries & np.uint64(_SWAPPED)) != 0  # anonymous data: written here, or swapped out
    mapped = ((entries & np.uint64(_PRESENT)) != 0) & ~kept
    if not mapped.any():
        return 0
    # runs of droppable pages: [begin, stop) where kept is False
    edges = np.flatnonzero(np.diff(np.concatenate(([True], kept, [True])).astype(np.int8)))
    for begin, stop in zip(edges[::2], edges[1::2]):
        madvise(start + int(begin) * page, int(stop - begin) * page, _MADV_DONTNEED)
    return int(mapped.sum()) * page
