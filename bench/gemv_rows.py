"""A decoder's text linears at a few rows a call: smolvlm's GEMV on the plain weights against PyTorch's
``F.linear`` on them and against oneDNN's packed weights, on this CPU.

Not run in CI. Which of the three a decode step of ``rows`` rows should run is what ``kernels.prepare``,
``upcast.text_gemv_pays`` and ``upcast.pack_gemv_linears`` decide per CPU; this measures it. The layers are
SmolVLM-256M's text decoder (30 x q/k/v/o 576x576 / 192x576, gate/up 1536x576, down 576x1536; random
weights), run one after another as a step runs them (each layer's input is the same random rows, so only
the linears are timed). Each variant: best of ``--reps`` passes after a warm-up pass, alternating.

    .venv/bin/python bench/gemv_rows.py [--dtypes bfloat16 float32] [--rows 1 2 4 8 16] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from smolvlm import cpu, kernels
from smolvlm.model.packed import PackedLinear, packing_available

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # out, in
LAYERS = 30


def layers(dtype: torch.dtype) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(i, o, bias=False, dtype=dtype) for _ in range(LAYERS) for o, i in SHAPES)


def best_ms(calls: list, xs: dict[int, torch.Tensor], reps: int) -> float:
    """``calls``: (in_features, fn) in a step's order; the best pass of ``reps``, in ms."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, fn in calls:
            fn(xs[k])
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if problem := kernels.build():  # the ops are called directly, whatever this CPU's policy (kernels.prepare)
        raise SystemExit(f"needs smolvlm's kernels: {problem}")
    print(f"CPU flags: {cpu.simd_flags()}; "
          f"torch {torch.__version__}, {args.threads} threads; {LAYERS} layers of {SHAPES} (out, in)")
    print("| dtype | rows | smolvlm GEMV, plain (ms) | F.linear, plain (ms) | oneDNN packed (ms) | GEMV vs best other |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        plain = layers(dtype)
        op = torch.ops.smolvlm.bf16_gemv if dtype == torch.bfloat16 else torch.ops.smolvlm.f32_gemv
        variants = {"gemv": [(m.in_features, lambda x, w=m.weight: op(x, w)) for m in plain],  # what GemvLinear calls
                    "plain": [(m.in_features, m) for m in plain]}
        if packing_available(dtype):
            variants["packed"] = [(m.in_features, PackedLinear.from_linear(m)) for m in plain]
        for rows in args.rows:
            xs = {i: torch.randn(rows, i).to(dtype) for i in {i for _, i in SHAPES}}
            for calls in variants.values():
                best_ms(calls, xs, 1)
            times = {k: float("inf") for k in variants}
            for _ in range(3):  # alternate
                for k, calls in variants.items():
                    times[k] = min(times[k], best_ms(calls, xs, max(1, args.reps // 3)))
            other = min(v for k, v in times.items() if k != "gemv")
            packed = f"{times['packed']:.2f}" if "packed" in times else "-"
            print(f"| {name} | {rows} | {times['gemv']:.2f} | {times['plain']:.2f} | {packed} | "
                  f"{other / times['gemv']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
