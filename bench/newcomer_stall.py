"""A newcomer's image against running streams: how long the streams wait, how long the newcomer waits.

Not run in CI. In one ``Engine`` (the server's, ``max_batch=8``, built as ``smolvlm serve`` loads the
model: ``batched=True``, the checkpoint's dtype), ``--streams`` greedy text requests decode; after
10 steps a request with one random ``--image`` x ``--image`` picture arrives. Until its first token,
every ``step()`` is timed (each holds a decode step of the streams plus the newcomer's slice). Per
round: the streams' longest and median step, the steps taken, and the newcomer's time to first token.
``--scenario idle``: the image alone on an idle engine (its time to first token), then again with a
short question arriving 0.1 s after it (the question's first token from its arrival, the image's from
its own). The engine admits a request between steps, as the server's loop does.

``--baseline REV`` measures a git revision too (a git worktree in the temp folder), in its own process,
alternating with this tree round by round, so both see the same machine state.

    .venv/bin/python bench/newcomer_stall.py --model bench/.cache/256M/ckpt --baseline 8a00a8d
    .venv/bin/python bench/newcomer_stall.py --model bench/.cache/2.2B/ckpt \
        --ref ../shared/reference/SmolVLM-Instruct --baseline 8a00a8d

``--ref``: a folder with the processor and tokenizer files, for checkpoints without them
(``bench/parity_full_size.py make 2.2B`` writes weights and config only). Writes
``bench/NEWCOMER_STALL.md`` (appends one section per model) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "NEWCOMER_STALL.md"
ARRIVE_S = 0.1  # --scenario idle: the question arrives this long after the image


def child(args: argparse.Namespace) -> None:
    """One round in this process, with whatever ``smolvlm`` is on the path; prints one JSON line."""
    import numpy as np
    import torch
    from PIL import Image

    from smolvlm.cli.common import load_model_and_processor
    from smolvlm.generation.config import resolve_settings
    from smolvlm.generation.engine import Engine
    from smolvlm.generation.feature_cache import FeatureCache
    from smolvlm.generation.requests import Request, TokenEvent

    model, proc = load_model_and_processor(args.folder, "auto", batched=True)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (args.image, args.image, 3), dtype=np.uint8))

    def request(text: str, images: list, new: int) -> tuple[Request, int]:
        out = proc.chat_inputs(text, images)
        inp = {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in out}
        n = inp["input_ids"].shape[1]
        settings = resolve_settings(model, n, max_new_tokens=new, do_sample=False, eos_token_id=[])
        return Request.from_inputs(inp, settings=settings), n

    def first_token(h) -> bool:
        return h.done or any(isinstance(e, TokenEvent) for e in list(h._queue.queue))

    if args.scenario == "idle":
        # the image alone on an idle engine; then again with a short question submitted after one step
        # requests are built (processor: tiling, tokenizing) before the clock starts, as a server's handler
        # builds them before it submits
        engine = Engine(model, max_batch=8, max_context=args.context, feature_cache=FeatureCache())
        req, n_tokens = request("Describe this image.", [img], 16)
        again = request("Describe this image.", [img], 16)[0]
        t0, h = time.perf_counter(), engine.submit(req)
        while not first_token(h):
            engine.step()
        lone = time.perf_counter() - t0
        h.cancel()
        engine = Engine(model, max_batch=8, max_context=args.context, feature_cache=FeatureCache())
        question = request("What is the capital of France?", [], 64)[0]
        t0, h = time.perf_counter(), engine.submit(again)
        t1, q, t_q, t_img = t0 + ARRIVE_S, None, None, None
        while t_q is None or t_img is None:
            engine.step()
            if q is None and time.perf_counter() >= t1:  # it arrived meanwhile; a server admits it now too
                q = engine.submit(question)
            t_q = t_q if t_q is not None or q is None or not first_token(q) else time.perf_counter() - t1
            t_img = t_img if t_img is not None or not first_token(h) else time.perf_counter() - t0
        for x in (h, q):
            x.cancel()
        while engine.step():
            pass
        print(json.dumps(dict(dtype=str(model.dtype).replace("torch.", ""), prompt_tokens=n_tokens, lone=lone,
                              question=t_q, image=t_img)))
        return

    engine = Engine(model, max_batch=8, max_context=args.context, feature_cache=FeatureCache())
    streams = [engine.submit(request(f"Tell me story number {i} about a cat.", [], args.context - 64)[0])
               for i in range(args.streams)]
    for _ in range(5):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(5):
        engine.step()
    alone = (time.perf_counter() - t0) / 5
    req, n_tokens = request("Describe this image.", [img], 16)
    handle = engine.submit(req)
    t_submit, steps = time.perf_counter(), []
    while True:
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
        if first_token(handle):
            break
    ttft = time.perf_counter() - t_submit
    for h in streams + [handle]:
        h.cancel()
    while engine.step():
        pass
    print(json.dumps(dict(dtype=str(model.dtype).replace("torch.", ""), prompt_tokens=n_tokens, step_alone=alone,
                          steps=len(steps), longest=max(steps), median=statistics.median(steps), ttft=ttft)))


def folder(model: Path, ref: Path | None, tmp: Path) -> Path:
    """The checkpoint folder, or one of links: its weights and config, the processor files from ``ref``."""
    if ref is None:
        return model
    for f in ref.iterdir():
        if f.name not in ("config.json", "PROVENANCE.md"):
            (tmp / f.name).symlink_to(f.resolve())
    for f in model.iterdir():
        if not (tmp / f.name).exists():
            (tmp / f.name).symlink_to(f.resolve())
    return tmp


def worktree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"smolvlm-worktree-{rev}"  # outside the tree: pytest never sees it
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def run_child(src: Path, args: argparse.Namespace, where: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", "--folder", str(where), "--streams", str(args.streams),
           "--image", str(args.image), "--context", str(args.context), "--scenario", args.scenario]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"the round under {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu() -> tuple[str, str]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return name, " ".join(f for f in flags if f.startswith(("avx", "amx"))) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder")
    ap.add_argument("--ref", type=Path, default=None, help="processor/tokenizer files, if the checkpoint lacks them")
    ap.add_argument("--baseline", default=None, help="a git revision to measure too, alternating")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--image", type=int, default=512, help="the newcomer's picture, pixels a side")
    ap.add_argument("--context", type=int, default=2048, help="the engine's context per row")
    ap.add_argument("--scenario", choices=("streams", "idle"), default="streams",
                    help="streams: the image arrives while --streams decode; idle: the image on an idle engine, "
                         "alone and with a short question arriving 0.1 s after it")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.model is None:
        ap.error("--model is required")
    with tempfile.TemporaryDirectory() as tmp:
        where = folder(args.model.resolve(), args.ref, Path(tmp))
        trees = [("this tree", ROOT / "src")]
        if args.baseline:
            trees.insert(0, (f"baseline {args.baseline}", worktree(args.baseline) / "src"))
        rows = []
        for r in range(args.rounds):
            for label, src in trees:
                res = run_child(src, args, where)
                rows.append((label, r, res))
                print(f"{label}, round {r}: {json.dumps(res)}", flush=True)
    name, flags = cpu()
    name_ = args.model.name if args.model.name != "ckpt" else args.model.parent.name
    head = (f"{args.streams} streams and a new {args.image}x{args.image} image" if args.scenario == "streams" else
            f"a {args.image}x{args.image} image on an idle engine, and a question {ARRIVE_S} s after it")
    lines = [f"## {name_}: {head}",
             "",
             f"Machine: {name}, {os.cpu_count()} cores, flags `{flags}`; torch threads as the engine sets them. "
             f"Commit of this tree: `{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}`. "
             f"Command: `{' '.join(['.venv/bin/python', 'bench/newcomer_stall.py', *sys.argv[1:]])}`",
             ""]
    if args.scenario == "streams":
        lines += ["| code | round | dtype | a step before it arrives | steps until its first token | the streams' longest step "
                  "| median step | its time to first token (prompt tokens) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r, res in rows:
            lines.append(f"| {label} | {r} | {res['dtype']} | {res['step_alone'] * 1e3:.0f} ms | {res['steps']} | "
                         f"{res['longest'] * 1e3:.0f} ms | {res['median'] * 1e3:.0f} ms | {res['ttft']:.2f} s "
                         f"({res['prompt_tokens']}) |")
    else:
        lines += ["| code | round | dtype | the image alone: first token (prompt tokens) | with the question: the question's "
                  "first token | the image's first token |",
                  "|---|---|---|---|---|---|"]
        for label, r, res in rows:
            lines.append(f"| {label} | {r} | {res['dtype']} | {res['lone']:.2f} s ({res['prompt_tokens']}) | "
                         f"{res['question']:.2f} s | {res['image']:.2f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        head = "" if OUT.exists() else ("# A newcomer's image against running streams\n\n"
                                        "Written by `bench/newcomer_stall.py` (its docstring says what is timed).\n\n")
        with OUT.open("a") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
