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
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Return the heap's free blocks to the OS (``malloc_trim(0)``), where the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
