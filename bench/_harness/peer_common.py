"""What every VLM child shares: the workload constants, the timer and the synthetic test images.

Only the standard library and numpy: the peer children run in bench-only venvs without smolvlm or
torch (llama.cpp's has numpy alone). ``vlm_child`` imports it as ``_harness.peer_common``; the peer
children, run as scripts from this folder, as ``peer_common``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

PROMPT_LEN = 900  # decode is measured at a ~900-token context
QUESTION = "Describe this image in detail."
GREEDY_N = 32  # greedy ids after the decode prompt, for the agreement row
# ours through the compiled decode step (smolvlm --compile-mode): engine-name suffix -> mode
# (VLM engines ours-compiled, ours-compiled-max; text rows ours-<quantize>-compiled...)
COMPILED_SUFFIXES = {"compiled": "default", "compiled-max": "max-autotune"}
COMPILED_ENGINES = {f"ours-{suffix}": mode for suffix, mode in COMPILED_SUFFIXES.items()}
# ours under another kernel policy (bench/run.py --kernel-policies): engine-name suffix -> SMOLVLM_CPU_KERNELS
# ("0": none of smolvlm's kernels, the policy AMX CPUs had before the twenty-third round; "1": all of them,
# as on a CPU without AMX). VLM engines ours-kernels-off, ours-kernels-all; text rows ours-<quantize>-kernels-...
KERNEL_SUFFIXES = {"kernels-off": "0", "kernels-all": "1"}
KERNEL_ENGINES = {f"ours-{suffix}": value for suffix, value in KERNEL_SUFFIXES.items()}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def test_pixels(width: int, height: int) -> np.ndarray:
    """The synthetic test image: (height, width, 3) uint8 noise, seeded by its size."""
    rng = np.random.default_rng(width * 7 + height)
    return np.ascontiguousarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
