"""Continuous-batching throughput: aggregate decode tokens/s of 1, 4, 8 concurrent streams through ``Engine``.

Not run in CI. Each configuration submits N greedy text requests (distinct ~60-token prompts, 64
new tokens, no stop ids, so every stream runs to the end) to one ``Engine(max_batch=8)`` and
drives ``step()`` in this thread. The first step (N prefills + the first decode) is excluded; the
clock covers the remaining decode steps only, so aggregate decode tokens/s = tokens those steps
produced / their time. Each figure is the median of ``--reps`` runs after one warm-up run; the
peer in the same process is ``generate_ids`` on one stream (the engine's 1-stream overhead).

    .venv/bin/python bench/engine_throughput.py [--model default] [--dtype float32] [--streams 1 4 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from smolvlm import SmolVLM, SmolVLMProcessor
from smolvlm.generation.config import resolve_settings
from smolvlm.generation.engine import Engine
from smolvlm.generation.generate import generate_ids
from smolvlm.generation.requests import Request

ROOT = Path(__file__).resolve().parents[1]
NEW = 64
TOPICS = ["the history of astronomy", "how bread is baked", "the water cycle", "the first railways",
          "how bees make honey", "the rules of chess", "volcanoes and earthquakes", "the printing press"]


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"\b(avx512_bf16|amx_tile|avx2|avx512f)\b", text)))) or "none of interest"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out + (" + uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prompts(proc: SmolVLMProcessor, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        text = (f"Please write a detailed, friendly explanation of {TOPICS[i % len(TOPICS)]} for a curious student, "
                f"with three short examples and one surprising fact (request {i}).")
        inp = proc.chat_inputs(text)
        out.append({"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]})
    return out


def run_engine(engine: Engine, model: SmolVLM, inps: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(decode seconds, decode tokens) for the given streams, all submitted at once."""
    handles = [engine.submit(Request.from_inputs(inp, settings=resolve_settings(
        model, inp["input_ids"].shape[1], max_new_tokens=NEW, eos_token_id=[]))) for inp in inps]
    engine.step()  # prefills + first decode: not timed
    before = engine.counters["generated_tokens"]
    t0 = time.perf_counter()
    while engine.step():
        pass
    dt = time.perf_counter() - t0
    assert all(h.finish is not None and h.finish.reason == "length" for h in handles)
    return dt, engine.counters["generated_tokens"] - before


def run_single(model: SmolVLM, inp: dict[str, torch.Tensor]) -> float:
    """generate_ids decode tokens/s for one stream: (NEW - 1) / (t(NEW) - t(1))."""
    def timed(n: int) -> float:
        t0 = time.perf_counter()
        generate_ids(model, **inp, max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t0
    return (NEW - 1) / (timed(NEW) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="checkpoint folder, repo id, or 'default' (built-in model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                    help="oneDNN-packed text linears (as the CLI loads)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 avoids OpenMP oversubscription when other processes share the cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = SmolVLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), pack=args.pack).eval()
    proc = SmolVLMProcessor.from_pretrained(args.model)
    print(f"# machine {platform.machine()} | CPU flags: {cpu_flags()} | {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()} | torch {torch.__version__} | {args.dtype} | pack {args.pack} | "
          f"commit {commit()}")
    print(f"# model {args.model}; greedy, {NEW} new tokens per stream; median of {args.reps} after a warm-up")
    inps = prompts(proc, max(args.streams))
    engine = Engine(model, max_batch=max(8, max(args.streams)), max_context=512)
    single = [run_single(model, inps[0]) for _ in range(max(1, args.reps))]
    print(f"# generate_ids, 1 stream: {statistics.median(single):.1f} decode tok/s")
    print("| streams | aggregate decode tok/s | per stream tok/s | vs 1 stream |")
    print("|---|---|---|---|")
    base = None
    for n in args.streams:
        run_engine(engine, model, inps[:n])  # warm-up
        rates = []
        for _ in range(args.reps):
            dt, toks = run_engine(engine, model, inps[:n])
            rates.append(toks / dt)
        rate = statistics.median(rates)
        base = rate if base is None else base
        print(f"| {n} | {rate:.1f} | {rate / n:.1f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
