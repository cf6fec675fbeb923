"""The decode attention of a bf16 query over a bf16 cache, per layer: the AVX2 loop (``decode_attention.cpp``)
against the AVX-512 BF16 kernel (``bf16_decode_attention.cpp``), switched with ``use_bf16_dot``.

Not run in CI; needs a CPU with AVX-512 BF16 (elsewhere both columns are the AVX2 loop). Two settings:
"in L2" calls one layer's cache again and again; "30 layers" calls 30 layers' caches in turn (20 MiB and
more, as a decode step reads them, though a step's weights also stream through the caches in between). Each
cell is the best and worst of 3 alternating rounds, each round the median of its calls, in us a layer.

    .venv/bin/python bench/decode_attention.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from smolvlm import cpu, kernels

SHAPES = [(9, 3, 900), (9, 3, 2000), (15, 5, 900), (32, 8, 900), (32, 8, 2000)]  # query heads, KV heads, keys


def median_us(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the op is called directly: built is enough, whatever this CPU's policy (AMX CPUs run it in decode too)
    if (problem := kernels.build()) or not cpu.has("avx512_bf16"):
        raise SystemExit(f"needs smolvlm's kernels on a CPU with AVX-512 BF16 ({problem or 'no AVX-512 BF16'})")
    op = torch.ops.smolvlm.decode_attention
    print(f"CPU flags: {cpu.simd_flags()}; torch {torch.__version__}, {args.threads} threads; us a layer, D 64")
    print("| heads | keys | in L2: AVX2 loop | in L2: AVX-512 BF16 | 30 layers: AVX2 loop | 30 layers: AVX-512 BF16 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    try:
        for hq, hkv, length in SHAPES:
            q = torch.randn(1, hq, 1, 64, generator=g).bfloat16()
            caches = [tuple(torch.randn(1, hkv, length + 64, 64, generator=g).bfloat16()[:, :, :length] for _ in range(2))
                      for _ in range(30)]
            runs = {"l2": lambda: op(q, *caches[0], None), "30": lambda: [op(q, k, v, None) for k, v in caches]}
            cells = {}
            for where, f in runs.items():
                for _ in range(3):
                    for dot in (False, True):
                        torch.ops.smolvlm.use_bf16_dot(dot)
                        f()
                        us = median_us(f, 200 if where == "l2" else 20) / (1 if where == "l2" else 30)
                        cells.setdefault((where, dot), []).append(us)
            span = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in cells.items()}
            print(f"| {hq} over {hkv} | {length} | {span['l2', False]} | {span['l2', True]} | {span['30', False]} | "
                  f"{span['30', True]} |", flush=True)
    finally:
        torch.ops.smolvlm.use_bf16_dot(cpu.has("avx512_bf16"))


if __name__ == "__main__":
    main()
