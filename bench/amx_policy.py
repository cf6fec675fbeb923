"""The twenty-third round's AMX kernel policy, measured on a CPU without AMX: old (every smolvlm kernel off)
against new (the fused decode step, its decode attention and RMSNorm, int8's GEMV for a row or two), both
over oneDNN's packed text weights.

Superseded on a real AMX CPU by ``bench/run.py --kernel-policies`` (twenty-fourth round, where AMX CPUs also
took smolvlm's GEMV of the plain text weights, ``kernels.ON_AMX``'s "float_gemv"); kept to regenerate that
round's table. Not run in CI. ``smolvlm.cpu.flags`` is made to report ``amx_tile`` too, so ``kernels.prepare``
decides as on an AMX CPU; the text linears are oneDNN-packed (``pack=True``, as AMX CPUs loaded them then), every
bf16 GEMV goes through oneDNN under both policies, and only what surrounds the GEMVs differs. With ``--quantize int8``
the new policy's single row also takes smolvlm's int8 GEMV where the old one takes PyTorch's (bf16; PyTorch's
has no AMX code, so an AMX CPU runs the same AVX-512 kernel as this one) or dequantizes (float32). The old
policy is the new one with ``kernels._state["use"]`` set to a reason (every kernel off), so both run in
one process, alternating, on one loaded model.

What it cannot show: AMX's own GEMV times (the same calls under both policies, so they shift both rows
alike), and PyTorch's one-query bf16 flash attention on AMX, which the old policy runs. Here, without AMX,
that call is ~7.7x slower than in float32 (``layers.cpu_attends_fast_in``), so the old policy's bf16 rows at a
long context are slower than an AMX CPU's would be; the float32 rows and the short-context bf16 rows are not
affected by it.

Decode tokens/s = N / (last token - first token) from per-token timestamps (as ``bench/run.py``'s child
measures it), greedy, never stopping early, after a prompt of ``--ctx`` random token ids (text only); the
checkpoint is ``bench/parity_full_size.py make 256M``'s (random weights of the real config). Also prints how
many greedy tokens the two policies share: float32 must share all (the same numbers up to summation order),
bf16 on random weights drifts after a few (near-ties; ``bench/run.py``'s method notes).

    .venv/bin/python bench/amx_policy.py [--ckpt bench/.cache/256M/ckpt] [--ctx 16 900] [--dtypes bfloat16 float32]
        [--quantize none int8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smolvlm import cpu, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="bench/.cache/256M/ckpt")
    ap.add_argument("--ctx", type=int, nargs="+", default=[16, 900])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4"])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    real = cpu.flags() or frozenset()
    if "amx_tile" in real:
        raise SystemExit("this CPU has AMX: measure the policies with bench/run.py --kernel-policies instead")
    shown = cpu.simd_flags()  # this CPU's own, before amx_tile is added
    cpu.flags = lambda: frozenset(real | {"amx_tile"})  # kernels.prepare decides as on an AMX CPU
    kernels.prepare()
    assert {k for k in kernels.KINDS if kernels.ready(k)} == set(kernels.ON_AMX), kernels.problem()  # + float_gemv,
    # which packed weights never call

    from smolvlm.generation.generate import generate_tokens
    from smolvlm.weights.load import load_model

    print(f"CPU flags: {shown}; "
          f"torch {torch.__version__}, {args.threads} threads; the policy as on an AMX CPU (cpu.flags + amx_tile)")
    print("| dtype | weights | context | old policy tok/s | new policy tok/s | ratio (medians) | greedy tokens shared |")
    print("|---|---|---|---|---|---|---|")
    for dtype, quantize in ((d, q) for q in args.quantize for d in args.dtypes):
        model = load_model(args.ckpt, dtype=dtype, pack=True, quantize=quantize)
        for ctx in args.ctx:
            ids = torch.randint(100, 40000, (1, ctx), generator=torch.Generator().manual_seed(0))

            def decode() -> tuple[float, list[int]]:
                times, toks = [], []
                for tok in generate_tokens(model, ids, max_new_tokens=args.new + 1, eos_token_id=[]):
                    times.append(time.perf_counter())
                    toks.append(int(tok[0]))
                return args.new / (times[-1] - times[0]), toks

            speed: dict[str, list[float]] = {"old": [], "new": []}
            tokens: dict[str, list[int]] = {}
            for _ in range(args.reps):
                for name, use in (("old", "off: the old AMX policy"), ("new", kernels.AMX)):
                    kernels._state["use"] = use
                    tps, tokens[name] = decode()
                    speed[name].append(tps)
            kernels._state["use"] = kernels.AMX
            old, new = (statistics.median(speed[k]) for k in ("old", "new"))
            shared = sum(a == b for a, b in zip(tokens["old"], tokens["new"]))
            span = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in speed.items()}
            print(f"| {dtype} | {quantize} | {ctx} | {span['old']} | {span['new']} | {new / old:.2f}x | "
                  f"{shared} / {len(tokens['new'])} |", flush=True)


if __name__ == "__main__":
    main()
